"""Each instance photo's training prompt: its caption file (`<image>.txt`, kohya's convention) or the template.

A caption may use `{token}` and `{class_noun}` or write the token itself ("a sks dog asleep on a red
sofa"); checked like every template (unknown placeholders refused, naming the file). A caption that
does not name the token teaches the class rather than the subject: a warning names the file.
"""

from __future__ import annotations

import logging
import re

from ..data import caption_file, read_captions
from ..prompts import check_template
from .config import TrainConfig

log = logging.getLogger(__name__)


def instance_prompts(config: TrainConfig, files: list[str]) -> list[str]:
    """One prompt per file of `files`, in order (with `config.captions` off: the template for every file)."""
    captions = read_captions(files) if config.captions else {}
    template = config.prompt(config.instance_prompt)
    token = re.compile(rf"(?<!\w){re.escape(config.token)}(?!\w)")
    prompts = []
    for file in files:
        if file not in captions:
            prompts.append(template)
            continue
        path = caption_file(file)
        prompt = config.prompt(check_template(f"caption in '{path}'", captions[file]))
        if not token.search(prompt):
            log.warning("caption in '%s' names neither {token} nor '%s': that photo teaches the class, not the subject", path, config.token)
        prompts.append(prompt)
    if captions:
        log.info("captions: %d of %d photos have their own prompt (<image>.txt)", len(captions), len(files))
    return prompts
