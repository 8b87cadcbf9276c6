"""The folder an engine for weight sync starts from: ``LLM(model=FOLDER, load_format="dummy", ...)``.

vLLM needs a model folder to build its model, even when every weight will come from the trainer: the
family's ``config.json`` (sizes, rope, norms) and, for text in and out, a tokenizer. :func:`engine_folder`
writes it from the trainer's model spec, so no config is written by hand and the two cannot disagree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from parallel_bridge.errors import ConfigError
from parallel_bridge.spec.model import GPTConfig


def engine_folder(config: GPTConfig, folder: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """Write ``config.json`` of ``config``'s family into ``folder`` (created), and the tokenizer if given: a
    folder of tokenizer files or an object with ``save_pretrained``. Without one, start the engine with
    ``skip_tokenizer_init=True`` and send token ids. Returns the folder."""
    config.check_supported()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config.to_hf(), indent=2))
    os.replace(tmp, out / "config.json")
    if tokenizer is None:
        return out
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    elif Path(tokenizer).is_dir():
        names = [p for p in Path(tokenizer).iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                                               "merges"))]
        if not names:
            raise ConfigError(f"tokenizer folder {tokenizer} holds no tokenizer files (tokenizer.json, vocab...)")
        for p in names:
            shutil.copy2(p, out / p.name)
    else:
        raise ConfigError(f"tokenizer {tokenizer!r} is neither a folder of tokenizer files nor a tokenizer object")
    return out
