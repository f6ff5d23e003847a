"""Texts an RL client builds with the *policy's* tokenizer, turned into the ids `qrm score` builds.

OpenRLHF sends `tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)` decoded with the policy's
tokenizer, so a query carries the policy's special-token texts (`<s>`, `</s>`, `<|im_end|>`, ...). Those the reward
tokenizer shares are stripped where it adds its own (`openrlhf_inputs`); those it does not know as special tokens
would be scored as words, and `PolicySpecials` removes them first. Used by `qrm serve` and `qrm.reward_function`."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=8)  # probed once per tokenizer, not per request
def _special_strings(tokenizer: Any) -> tuple[list[str], list[str], int]:
    """Texts of the tokens the tokenizer adds before a sequence, of those it (or qrm: EOS) adds after it, and how
    many ids qrm adds around every sequence (as `qrm.data.tokenize_pairs` adds them)."""
    from .data import special_tokens

    prefix, suffix = special_tokens(tokenizer)
    lead = [t for t in tokenizer.convert_ids_to_tokens(prefix) if t]
    trail = [t for t in tokenizer.convert_ids_to_tokens(suffix) if t]
    if tokenizer.eos_token:
        trail.append(tokenizer.eos_token)
    closing = 0 if (suffix or tokenizer.eos_token_id is None) else 1
    return lead, trail, len(prefix) + len(suffix) + closing


def _strip(text: str, lead: list[str], trail: list[str]) -> tuple[str, bool]:
    """`text` without any leading `lead` / trailing `trail` token texts; whether a leading one was removed."""
    stripped, again = False, True
    while again:
        again = False
        for s in lead:
            if text.startswith(s):
                text, stripped, again = text[len(s) :], True, True
        for s in trail:
            if text.endswith(s):
                text, again = text[: -len(s)], True
    return text, stripped


def special_token_texts(tokenizer: Any) -> set[str]:
    """Every special-token text of `tokenizer`: BOS/EOS/PAD/... and added tokens marked special."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            texts.add(str(tok))
    return {t for t in texts if t}


class PolicySpecials:
    """The policy tokenizer's special-token texts that the reward tokenizer would read as words, removed from texts.

    Args:
        policy_tokenizer (`PreTrainedTokenizerBase`, `str` or `Path`): the policy's tokenizer, or a dir / Hub id
            `AutoTokenizer` loads it from.
        reward_tokenizer (`PreTrainedTokenizerBase`): the reward model's tokenizer; special tokens it shares with
            the policy are left to `openrlhf_inputs` (stripped where qrm adds its own, kept elsewhere, as training
            saw them).
    """

    def __init__(self, policy_tokenizer: Any, reward_tokenizer: Any):
        if isinstance(policy_tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            policy_tokenizer = AutoTokenizer.from_pretrained(policy_tokenizer)
        own = special_token_texts(reward_tokenizer)
        # Longest first, so "<|im_end|>" goes before a "<|" that might also be special.
        self.texts = sorted(special_token_texts(policy_tokenizer) - own, key=len, reverse=True)

    def remove(self, text: str) -> tuple[str, bool]:
        """`text` without the policy's special-token texts; whether one was removed at its start (the decoder may
        then have written a space after it)."""
        leading = False
        for s in self.texts:
            if s in text:
                leading = leading or text.lstrip().startswith(s)
                text = text.replace(s, "")
        return text, leading

    def __call__(self, items: Sequence[Any]) -> list[Any]:
        """`remove` for each text; in message lists (`{"role", "content"}`), for each string content."""

        def clean(x: Any) -> Any:
            if isinstance(x, str):
                return self.remove(x)[0]
            if isinstance(x, list):
                return [clean(m) for m in x]
            if isinstance(x, dict) and isinstance(x.get("content"), str):
                return {**x, "content": self.remove(x["content"])[0]}
            return x

        return [clean(x) for x in items] if self.texts else list(items)

    def __repr__(self) -> str:
        return f"PolicySpecials({self.texts!r})"


def openrlhf_inputs(
    tokenizer: Any,
    queries: Sequence[str],
    prompts: Sequence[str] | None,
    max_length: int,
    policy: PolicySpecials | None = None,
) -> tuple[list[list[int]], list[bool], list[bool]]:
    """Token ids for OpenRLHF queries, equal to `qrm score`'s ids for the same prompt and response.

    OpenRLHF sends `query` = `tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)` (openrlhf/utils/
    agent.py, `SingleTurnAgentExecutor.execute`) with the policy's tokenizer, so a query may carry BOS/[CLS] and
    EOS/[SEP]. The policy's special-token texts the reward tokenizer does not know (`policy`) are removed first;
    the reward tokenizer's own are stripped (all leading copies of what it puts first; trailing EOS and what it puts
    last) before qrm adds them once. When `prompts[i]` is given and the stripped query starts with it (also
    stripped), the query is scored as (prompt, rest) exactly like `qrm score`; otherwise, or when the rest alone
    exceeds `max_length`, the whole query is scored as one text, its start cut to fit `max_length`.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the reward model's tokenizer.
        queries (`Sequence[str]`): prompt + response texts.
        prompts (`Sequence[str]` or `None`): the prompt of each query, or None.
        max_length (`int`): the reward model's max_length.
        policy (`PolicySpecials`, *optional*): the policy tokenizer's special-token texts to remove, when the
            policy's tokenizer is not the reward model's.

    Returns:
        `tuple[list[list[int]], list[bool], list[bool]]`: ids, whether each query was split at its prompt, and
        whether its start was cut.
    """
    from .reward_model import tokenize_responses

    lead, trail, fixed = _special_strings(tokenizer)
    heads, tails, split = [], [], []
    for i, q in enumerate(queries):
        p = None if prompts is None else prompts[i]
        removed = False
        if policy is not None:
            q, removed = policy.remove(q)
            p = None if p is None else policy.remove(p)[0]
        text, stripped = _strip(q, lead, trail)
        p = None if p is None else _strip(p, lead, trail)[0]
        # decode() writes a space after a special token for WordPiece and SentencePiece vocabularies.
        if p and (stripped or removed) and not text.startswith(p) and text.startswith(" " + p):
            text = text[1:]
        if p and text.startswith(p):
            heads.append(p), tails.append(text[len(p) :]), split.append(True)
        else:  # the whole query as the "prompt" with an empty response: same ids, and cut from the left if long
            heads.append(text), tails.append(""), split.append(False)
    ids = tokenize_responses(tokenizer, heads, tails, max_length)
    redo = [i for i, x in enumerate(ids) if x is None]
    if redo:  # a response alone longer than max_length: score the query's last max_length tokens
        whole = tokenize_responses(tokenizer, [heads[i] + tails[i] for i in redo], [""] * len(redo), max_length)
        for i, x in zip(redo, whole, strict=True):
            ids[i], split[i] = x, False
    # Cutting the prompt's start makes a sequence exactly max_length long; only those can have been cut.
    cut = [False] * len(ids)
    for i, x in enumerate(ids):
        if x is not None and len(x) == max_length:
            n = sum(len(t) for t in tokenizer([heads[i], tails[i]], add_special_tokens=False)["input_ids"])
            cut[i] = n + fixed > max_length
    return ids, split, cut  # type: ignore[return-value]
