"""The tokenizer an export ships: plain-text clients (`pipeline`, vLLM, TRL) must get the ids training used.

qrm tokenizes prompt and response separately and closes the sequence with EOS; most decoder tokenizers add BOS but
not EOS. `align_tokenizer` gives the exported tokenizer a post-processor that appends it, `plain_chat_template`
writes qrm's plain conversation layout as a chat template, and `save_tokenizer` ships both, checked on reload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def align_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """Make `tokenizer(text)` add the special tokens qrm's `tokenize_pairs` adds, so that plain-text serving
    (`pipeline`, vLLM) sees the same ids: qrm closes every sequence with EOS, most decoder tokenizers do not.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the training tokenizer; its fast post-processor (and the
            add_eos_token flag that some tokenizers rebuild it from on load) is changed in place.

    Returns:
        `dict`: what was done (`changed`, `plain_text_adds_qrm_specials`, the prefix and suffix ids, a `note` when
        it could not be done). The check that a saved copy reloads the same way is `save_tokenizer`'s."""
    from .data import special_tokens

    prefix, suffix = special_tokens(tokenizer)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    info: dict[str, Any] = {"prefix_ids": prefix, "suffix_ids": suffix, "changed": False}
    if suffix or eos_id is None:
        info["plain_text_adds_qrm_specials"] = True
        return info
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        info.update(plain_text_adds_qrm_specials=False, note="slow tokenizer: append the EOS token to the text")
        return info
    from tokenizers import processors

    original = backend.post_processor
    names = tokenizer.convert_ids_to_tokens(prefix)
    specials = {**dict(zip(names, prefix, strict=True)), eos: eos_id}
    if original is None or isinstance(original, processors.TemplateProcessing):
        single = [*names, "$A", eos]
        pair = [*[f"{n}:0" for n in names], "$A:0", f"{eos}:0", *[f"{n}:1" for n in names], "$B:1", f"{eos}:1"]
        new = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))
    else:  # e.g. ByteLevel offsets or a Sequence: keep it and append EOS after it
        tail = processors.TemplateProcessing(
            single=["$A", eos], pair=["$A:0", f"{eos}:0", "$B:1", f"{eos}:1"], special_tokens=[(eos, eos_id)]
        )
        new = processors.Sequence([original, tail])
    backend.post_processor = new
    if "add_bos_token" in tokenizer.init_kwargs or "add_eos_token" in tokenizer.init_kwargs:
        # transformers rebuilds the post-processor from these flags when they are in tokenizer_config.json.
        tokenizer.init_kwargs["add_eos_token"] = True
        object.__setattr__(tokenizer, "_add_eos_token", True)
    if special_tokens(tokenizer) != (prefix, [eos_id]):
        backend.post_processor = original
        info.update(plain_text_adds_qrm_specials=False, note="post-processor could not be changed: append EOS")
        return info
    info.update(changed=True, plain_text_adds_qrm_specials=True, added_suffix_ids=[eos_id])
    info["original_post_processor"] = type(original).__name__ if original is not None else None
    return info


def plain_chat_template(bos: bool = False) -> str:
    """qrm's plain conversation layout (`qrm.data.render_messages` without a chat template) as a Jinja chat
    template: `apply_chat_template(messages, tokenize=False)` then renders what training rendered.

    Args:
        bos (`bool`, *optional*, defaults to `False`): start with `{{ bos_token }}`, for tokenizers that put BOS in
            front of every sequence (as Llama 3's and Gemma's templates do): clients that tokenize the rendered text
            with `add_special_tokens=False` (OpenRLHF, TRL's `reward_funcs=<dir>`, vLLM's `messages`) then get the
            BOS training had. qrm drops the rendered copy before adding its own (`qrm.data.conversation_pair`).

    Each role marker is followed by one space unless the content starts with whitespace (`qrm.data.plain_turn`), so
    the generation prompt followed by a completion `" text"` renders exactly as the assistant turn `" text"` or
    `"text"`."""
    from .data import HH_ASSISTANT, PLAIN_ROLE_NAMES, PLAIN_SPACES

    q = json.dumps  # a JSON string literal is a valid Jinja string literal, escapes included
    branches = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {q(role)} -%}}{{{{ {q(chr(10) * 2 + name + ':')} }}}}"
        for i, (role, name) in enumerate(PLAIN_ROLE_NAMES.items())
    )
    unknown = "{{ raise_exception(\"qrm's plain template has no role \" + message['role']) }}"
    space = f"{{%- if message['content'][:1] not in [{', '.join(q(c) for c in PLAIN_SPACES)}] -%}}{{{{ ' ' }}}}{{%- endif -%}}"
    return (
        ("{{- bos_token -}}" if bos else "")
        + f"{{%- for message in messages -%}}{branches}{{%- else -%}}{unknown}{{%- endif -%}}"
        f"{space}{{{{ message['content'] }}}}{{%- endfor -%}}"
        f"{{%- if add_generation_prompt -%}}{{{{ {q(HH_ASSISTANT)} }}}}{{%- endif -%}}"
    )


def save_tokenizer(adapter: Path, folder: Path) -> dict[str, Any]:
    """Save the adapter's tokenizer into the export, aligned when a reloaded copy keeps the alignment, with the
    chat template training rendered conversations with (qrm's plain layout when the tokenizer had none).

    Args:
        adapter (`Path`): the adapter dir (`qrm train`) holding the training tokenizer.
        folder (`Path`): the export being written.

    Returns:
        `dict`: `align_tokenizer`'s record plus `chat_template` (`training` or `qrm-plain`); stored in
        `qrm_export.json` and read by the model card."""
    from transformers import AutoTokenizer

    from .data import special_tokens

    def load() -> Any:
        tok = AutoTokenizer.from_pretrained(adapter)
        if not getattr(tok, "chat_template", None):
            # Training put BOS in front of every sequence: the template writes it, for add_special_tokens=False clients.
            prefix = special_tokens(tok)[0]
            tok.chat_template = plain_chat_template(
                bos=tok.bos_token_id is not None and prefix[:1] == [tok.bos_token_id]
            )
        return tok

    tokenizer = load()
    info = align_tokenizer(tokenizer)
    had_template = bool(getattr(AutoTokenizer.from_pretrained(adapter), "chat_template", None))
    info["chat_template"] = "training" if had_template else "qrm-plain"
    tokenizer.save_pretrained(folder)
    if info["changed"] and special_tokens(AutoTokenizer.from_pretrained(folder)) != special_tokens(tokenizer):
        # Some tokenizer classes rebuild their post-processor on load: ship the training tokenizer unchanged.
        load().save_pretrained(folder)
        info.update(changed=False, plain_text_adds_qrm_specials=False, note="reload drops the EOS post-processor")
    return info
