"""`qrm.reward_function` inside TRL's real `GRPOTrainer`: the rewards TRL receives are qrm's scores of the same texts.

The same run also passes the export directory itself (`reward_funcs="<dir>"`) so TRL's own route is measured beside
it: TRL tokenizes `prompt + completion` with add_special_tokens=False, which is not what the model was trained on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import HH_TEST, hh_rows, write_jsonl

import qrm
from qrm import RewardModel
from qrm.export_tokenizer import plain_chat_template
from qrm.score import main as score_main

PLAIN_PROMPTS = ["\n\nHuman: What is 2 + 2?\n\nAssistant:", "\n\nHuman: Name a colour.\n\nAssistant:"]
CHAT_PROMPTS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Name a colour."}],
]


def _grpo(policy: Path, export: str, prompts: list, out: Path) -> tuple:
    """Two GRPO steps on CPU (tiny random policy, 2 completions of <= 8 tokens per prompt) with two reward funcs:
    qrm.reward_function(export) wrapped to record what TRL passes and gets, and the export dir itself."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    fn = qrm.reward_function(export, batch_size=3)
    calls: list[dict] = []

    def recorded(prompts, completions, **kwargs):
        rewards = fn(prompts, completions, **kwargs)
        calls.append({"prompts": prompts, "completions": completions, "rewards": rewards, "kwargs": sorted(kwargs)})
        return rewards

    recorded.__name__ = fn.__name__
    tok = AutoTokenizer.from_pretrained(policy)
    tok.chat_template = plain_chat_template()  # the random policy has none; conversational prompts need one
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(policy),
        reward_funcs=[recorded, export],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tok,
    )
    trl_dir: list[float] = []  # what TRL's own forward of the export directory gave
    trainer.reward_funcs[1].register_forward_hook(lambda m, i, o: trl_dir.extend(o.logits[:, 0].tolist()))
    trainer.train()
    return trainer, fn, calls, trl_dir


def _check_trl_received_qrm_rewards(trainer, fn, calls: list[dict], rm: RewardModel) -> tuple[list, list, list]:
    assert len(calls) == 2  # one generation batch per step: 1 prompt x 2 completions
    prompts = [p for c in calls for p in c["prompts"]]
    completions = [x for c in calls for x in c["completions"]]
    got = [r for c in calls for r in c["rewards"]]
    assert len(got) == 4 and all(isinstance(r, float) and math.isfinite(r) for r in got)
    assert {"completion_ids", "trainer_state"} <= set(calls[0]["kwargs"])
    want = rm.score_batch(prompts, completions)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-6
    # ... and TRL used them: its logged mean reward per step is the mean of what the function returned.
    logged = [h[f"rewards/{fn.__name__}/mean"] for h in trainer.state.log_history if f"rewards/{fn.__name__}/mean" in h]
    assert logged == pytest.approx([sum(c["rewards"]) / 2 for c in calls], abs=1e-5)
    return prompts, completions, got


@pytest.fixture(scope="module")
def rm(rm_export: dict) -> RewardModel:
    return RewardModel.from_pretrained(rm_export["out_dir"], device="cpu")


def test_grpo_plain_prompts_get_qrm_score_rewards(tiny_llama, rm_export, rm, tmp_path, capsys) -> None:
    export = rm_export["out_dir"]
    trainer, fn, calls, trl_dir = _grpo(tiny_llama, export, PLAIN_PROMPTS, tmp_path / "grpo")
    assert fn.__name__ == "qrm_exact-fp32" and all(isinstance(p, str) for p in calls[0]["prompts"])
    prompts, completions, got = _check_trl_received_qrm_rewards(trainer, fn, calls, rm)
    # `qrm score` on the same (prompt, completion) rows gives the same numbers.
    rows = write_jsonl(
        tmp_path / "rows.jsonl", [{"prompt": p, "response": c} for p, c in zip(prompts, completions, strict=True)]
    )
    assert (
        score_main(["--model", export, "--data", str(rows), "--out", str(tmp_path / "r.jsonl"), "--no-progress"]) == 0
    )
    cli = [json.loads(line)["reward"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert max(abs(a - b) for a, b in zip(got, cli, strict=True)) < 1e-6
    # reward_funcs="<dir>": TRL scored the same completions without BOS/EOS, so other numbers.
    assert len(trl_dir) == 4 and max(abs(a - b) for a, b in zip(trl_dir, got, strict=True)) > 1e-3
    # HH-RLHF test texts through TRL's own reward code path, both routes side by side.
    measure_dir_route(trainer, rm, capsys)


def measure_dir_route(trainer, rm: RewardModel, capsys) -> None:
    """TRL's `_calculate_rewards` on HH-RLHF test pairs that fit max_length: column 0 is qrm.reward_function, column 1 the dir route."""
    from qrm.data import split_implicit
    from qrm.metrics import spearman
    from qrm.reward_model import tokenize_responses

    pairs = [split_implicit(r["chosen"], r["rejected"]) for r in hh_rows(200, HH_TEST)]
    texts = [(p, c) for p, *responses in pairs for c in responses]
    ids = tokenize_responses(rm.tokenizer, [p for p, _ in texts], [c for _, c in texts], max_length=10**6)
    texts = [t for t, x in zip(texts, ids, strict=True) if len(x) <= rm.max_length][:64]  # no prompt cut by qrm
    prompts, completions = [p for p, _ in texts], [c for _, c in texts]
    inputs = [{"prompt": p} for p in prompts]
    rewards = trainer._calculate_rewards(inputs, prompts, completions, [[0]] * len(texts))
    ours, theirs = rewards[:, 0].tolist(), rewards[:, 1].tolist()
    assert max(abs(a - b) for a, b in zip(ours, rm.score_batch(prompts, completions), strict=True)) < 1e-6
    delta = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    rho = spearman(ours, theirs)
    with capsys.disabled():
        print(f"\nreward_funcs=<dir> vs qrm on {len(texts)} HH test texts: max |Δ| {delta:.3f}, Spearman {rho:.3f}")
    assert delta > 1e-3 and rho < 0.999


def test_grpo_conversational_prompts_get_qrm_score_rewards(tiny_llama, rm_export, rm, tmp_path) -> None:
    """Conversational dataset: TRL passes message lists; the export's chat template (qrm's plain layout) also makes
    TRL's dir route work, and qrm renders the conversations exactly as its data pipeline does."""
    from qrm.data import render_messages

    trainer, fn, calls, trl_dir = _grpo(tiny_llama, rm_export["out_dir"], CHAT_PROMPTS, tmp_path / "grpo")
    assert isinstance(calls[0]["prompts"][0], list) and calls[0]["completions"][0][0]["role"] == "assistant"
    prompts, completions, got = _check_trl_received_qrm_rewards(trainer, fn, calls, rm)
    assert len(trl_dir) == 4
    plain = rm.tokenizer.__class__.from_pretrained(rm_export["out_dir"])
    plain.chat_template = None
    rendered = [rm.render(p, c) for p, c in zip(prompts, completions, strict=True)]
    for (p, c), (text_p, text_c) in zip(zip(prompts, completions, strict=True), rendered, strict=True):
        assert text_p == render_messages(p, plain, add_generation_prompt=True)
        assert text_p + text_c == render_messages(p + c, plain, add_generation_prompt=False)
    # The rendered strings score as the conversations did (what `qrm score` gives for those texts).
    assert got == pytest.approx(rm.score_batch([p for p, _ in rendered], [c for _, c in rendered]), abs=1e-6)


def test_reward_function_options_and_errors(rm_export, rm, tmp_path) -> None:
    fn = qrm.reward_function(rm, batch_size=1, name="helpful")
    assert fn.__name__ == "helpful" and fn.reward_model is rm
    prompt = PLAIN_PROMPTS[0]
    long = " word" * 400  # alone longer than the recipe's max_length (128): unscorable, not a crash
    out = fn([prompt, prompt], [" 4", long])
    assert out[0] == pytest.approx(rm.score(prompt, " 4"), abs=1e-6) and out[1] is None
    # TRL's continue-final-message form and typed text parts render like the plain message.
    cont = fn(
        [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]],
        [[{"role": "assistant", "content": "lo"}]],
    )
    typed = fn(
        [[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]], [[{"role": "assistant", "content": "Hello"}]]
    )
    want = rm.score("\n\nHuman: Hi\n\nAssistant:", " Hello")
    assert cont == pytest.approx([want], abs=1e-6) and typed == pytest.approx([want], abs=1e-6)
    with pytest.raises(ValueError, match="both be strings or both be message lists"):
        fn([prompt], [[{"role": "assistant", "content": "4"}]])
    with pytest.raises(FileNotFoundError, match="not a qrm export or adapter dir"):
        qrm.reward_function(tmp_path)


def _run_readme_snippet(heading: str, export_dir: str, tmp_path: Path, monkeypatch, capsys) -> tuple[str, list[str]]:
    """Run the first python block under `heading` in the README, verbatim, where `exports/demo-minilm` is the tests'
    export; returns the code and the lines it printed."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme[readme.index(heading) :], re.S).group(1)
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "demo-minilm").symlink_to(export_dir)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    return code, capsys.readouterr().out.strip().splitlines()


def test_readme_snippet_runs_as_written(rm_export, rm, tmp_path, monkeypatch, capsys) -> None:
    """The README's TRL snippet, verbatim, run where `exports/demo-minilm` is the tests' export."""
    code, lines = _run_readme_snippet("### TRL GRPO / RLOO", rm_export["out_dir"], tmp_path, monkeypatch, capsys)
    assert 'qrm.reward_function("exports/demo-minilm")' in code
    assert len(lines) == 2 and lines[0] == lines[1], lines
    want = rm.score("\n\nHuman: What is 2 + 2?\n\nAssistant:", " 4")
    assert json.loads(lines[0])[0] == pytest.approx(want, abs=1e-6)


def test_adapter_dir_scores_conversations_like_its_export(rm_adapter, rm) -> None:
    """The adapter dir (4-bit base + LoRA, tokenizer without a chat template) renders a conversation with qrm's plain
    layout, the export with the chat template it ships: same texts, same reward."""
    fn = qrm.reward_function(rm_adapter)
    assert fn.__name__ == "qrm_adapter"
    prompts, completions = (
        CHAT_PROMPTS,
        [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "Red."}]],
    )
    assert [fn.reward_model.render(p, c) for p, c in zip(prompts, completions, strict=True)] == [
        rm.render(p, c) for p, c in zip(prompts, completions, strict=True)
    ]
    assert fn(prompts, completions) == pytest.approx(rm.score_batch(prompts, completions), abs=1e-5)


def test_readme_pipeline_snippet_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    """The README's transformers-pipeline snippet, verbatim, on a MiniLM export (the snippet's `demo-minilm`): default
    settings give qrm's raw reward, for plain text and for a conversation rendered by the export's chat template.
    (A decoder export's template also writes BOS, which `pipeline` adds again: see docs/serving.md.)"""
    from conftest import MINILM
    from tiny_exports import seeded_export

    export = seeded_export(MINILM, tmp_path / "minilm-export")
    rm = RewardModel.from_pretrained(export, device="cpu")
    _, lines = _run_readme_snippet("### transformers pipeline", str(export), tmp_path, monkeypatch, capsys)
    want = rm.score("\n\nHuman: What is 2 + 2?\n\nAssistant:", " 4")
    assert [float(x) for x in lines] == pytest.approx([want, want], abs=1e-5)


def test_rloo_with_a_policy_of_another_tokenizer(tiny_llama, tmp_path, capsys) -> None:
    """TRL's real `RLOOTrainer`, 2 steps, with `qrm.reward_function` of a MiniLM export while the policy is a Llama:
    the prompts carry the policy's `<s>` (as a template that writes `{{ bos_token }}` renders them). With
    `policy_tokenizer` the rewards TRL receives are `qrm score`'s for the texts without it; without, `<s>` is scored
    as words."""
    from conftest import MINILM
    from datasets import Dataset
    from tiny_exports import seeded_export
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    export = seeded_export(MINILM, tmp_path / "minilm-export")
    fn = qrm.reward_function(export, batch_size=4, policy_tokenizer=tiny_llama)
    calls: list[dict] = []

    def recorded(prompts, completions, **kwargs):
        rewards = fn(prompts, completions, **kwargs)
        calls.append({"prompts": prompts, "completions": completions, "rewards": rewards})
        return rewards

    recorded.__name__ = fn.__name__
    args = RLOOConfig(
        output_dir=str(tmp_path / "rloo"), per_device_train_batch_size=2, num_generations=2, max_completion_length=8,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = RLOOTrainer(
        model=str(tiny_llama),
        reward_funcs=recorded,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "<s>" + p} for p in PLAIN_PROMPTS]),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama),
    )
    trainer.train()
    assert len(calls) == 2
    prompts = [p for c in calls for p in c["prompts"]]
    completions = [x for c in calls for x in c["completions"]]
    got = [r for c in calls for r in c["rewards"]]
    assert all(p.startswith("<s>") for p in prompts) and len(got) == 4
    rm = fn.reward_model
    want = rm.score_batch([p.removeprefix("<s>") for p in prompts], completions)
    delta = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert delta < 1e-6
    as_words = qrm.reward_function(rm)(prompts, completions)
    words = max(abs(a - b) for a, b in zip(as_words, want, strict=True))
    assert words > 1e-5
    with capsys.disabled():
        print(f"\nRLOOTrainer, Llama policy, MiniLM export: policy_tokenizer {delta:.2g}, without {words:.3g}")
    logged = [h[f"rewards/{fn.__name__}/mean"] for h in trainer.state.log_history if f"rewards/{fn.__name__}/mean" in h]
    assert logged == pytest.approx([sum(c["rewards"]) / 2 for c in calls], abs=1e-5)


def test_trl_get_reward_on_a_decoder_export_and_not_an_encoder(rm, tmp_path, capsys) -> None:
    """TRL's PPO-era reward utility (`trl.experimental.utils.get_reward`, TRL 1.16) on qrm's ids: a decoder export
    gives `qrm score`'s rewards; an encoder export cannot be used (it reads `model.score`, BERT's head is
    `classifier`)."""
    import torch
    from conftest import MINILM
    from tiny_exports import seeded_export
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.utils import get_reward

    pairs = [(p, " 4") for p in PLAIN_PROMPTS] + [(PLAIN_PROMPTS[1], " Blue, like the sky.")]
    ids = rm.tokenize([p for p, _ in pairs], [c for _, c in pairs])
    pad = rm.tokenizer.pad_token_id
    batch = torch.full((len(ids), max(map(len, ids))), pad)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
    with torch.no_grad():
        _, got, _ = get_reward(rm.model, batch, pad, 0)
    delta = max(abs(a - b) for a, b in zip(got.tolist(), rm.score_batch(*zip(*pairs, strict=True)), strict=True))
    assert delta < 1e-5
    encoder = AutoModelForSequenceClassification.from_pretrained(seeded_export(MINILM, tmp_path / "minilm"))
    with pytest.raises(AttributeError, match="score"):
        get_reward(encoder, batch.clamp(max=100), 0, 0)
    with capsys.disabled():
        print(f"\nTRL get_reward on the tiny Llama export vs qrm score: {delta:.2g} ({len(pairs)} texts)")
