"""`qrm push` against a local fake Hub (tests/fake_hub.py): nothing here contacts huggingface.co."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Importable without installing qrm (qrm/__init__.py may not exist yet) and without a conftest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_hub import FakeHub

from qrm.card import model_card

REPO_ROOT = Path(__file__).resolve().parents[1]

TOKEN = "hf_FAKEtokenForTestsOnly0123456789abcdefXYZ"
BASE = "sentence-transformers/all-MiniLM-L6-v2"
ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "qrm_recipe.yaml",
    "qrm_versions.json",
}
EXTRA_FILES = {"metrics.json", "trainer_state.json"}
SKIPPED = ["checkpoint-10/", "runs/", ".hidden", "training_args.bin", "extra.pt"]


def _safetensors(path: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"lora_A.weight": torch.randn(4, 8, generator=g), "score.weight": torch.randn(1, 8, generator=g)}, path)


def _tokenizer(d: Path) -> None:
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordPiece"}}))
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A small adapter dir as qrm train leaves it, with the junk push must leave behind."""
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": BASE, "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4})
    )
    _safetensors(d / "adapter_model.safetensors", 0)
    _tokenizer(d)
    (d / "qrm_recipe.yaml").write_text("model_name_or_path: " + BASE + "\nlora_r: 4\n")
    (d / "qrm_versions.json").write_text(json.dumps({"qrm": "0.1.0", "trl": "1.16.0"}))
    (d / "metrics.json").write_text(json.dumps({"eval_accuracy": 0.75}))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (d / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (d / "extra.pt").write_bytes(b"\x80\x04pickle")
    (d / ".hidden").write_text("x")
    (d / "checkpoint-10").mkdir()
    _safetensors(d / "checkpoint-10" / "adapter_model.safetensors", 1)
    (d / "runs").mkdir()
    (d / "runs" / "events.out.tfevents").write_bytes(b"tb")
    return d


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    """A small merged export dir with its own README.md."""
    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"_name_or_path": BASE, "architectures": ["BertForSequenceClassification"]})
    )
    _safetensors(d / "model.safetensors", 2)
    _tokenizer(d)
    (d / "README.md").write_text("---\nlibrary_name: transformers\n---\n# My export\n")
    return d


# Variables of the caller's shell that change what huggingface_hub does (TRANSFORMERS_OFFLINE=1 turns on its offline
# mode too): none may leak into a test, so the suite passes the same in any shell.
CALLER_HUB_PREFIXES = ("HF_", "HUGGING", "TRANSFORMERS_", "QRM_")


def run_push(
    args: list[str],
    tmp_path: Path,
    hub: FakeHub | None = None,
    token: str | None = TOKEN,
    extra_env: dict[str, str] | None = None,
):
    """Run scripts/push.py in a fresh interpreter: huggingface_hub reads HF_ENDPOINT at import time."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(CALLER_HUB_PREFIXES) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        HF_HOME=str(tmp_path / "hf_home"),  # no saved login leaks in from the machine
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",  # the fake speaks the legacy LFS protocol, not Xet
        # Any request for a host other than the fake goes to a dead proxy and fails the push.
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
        HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9",
    )
    if token:
        env["HF_TOKEN"] = token
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "push.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def _all_bytes_under(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def test_push_adapter_is_one_commit_with_exact_files_and_bytes(adapter_dir: Path, tmp_path: Path) -> None:
    with FakeHub(token=TOKEN, lfs_suffixes=(".safetensors",)) as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm"], tmp_path, hub)
    assert res.returncode == 0, res.stderr
    assert len(hub.commits) == 1 and hub.endpoints().count("commit") == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision) == ("me/rm", "main")
    assert set(commit.files) == ADAPTER_FILES | EXTRA_FILES | {"README.md"}
    for name, data in commit.files.items():
        if name != "README.md":
            assert data == (adapter_dir / name).read_bytes(), name
    assert hub.lfs_objects, "safetensors should have gone through the LFS upload"
    assert "unknown" not in hub.endpoints()
    # The card was generated in memory: the dir is left as it was.
    assert not (adapter_dir / "README.md").exists()
    card = commit.files["README.md"].decode()
    assert BASE in card and "eval_accuracy" in card and "PeftModel.from_pretrained(base, adapter)" in card
    # The adapter's tokenizer (qrm may have added a pad token) sizes the base's embeddings before PEFT loads.
    assert "AutoTokenizer.from_pretrained(adapter)" in card and "base.resize_token_embeddings(len(tokenizer))" in card
    for skipped in SKIPPED:
        assert f"skip  {skipped}:" in res.stdout
    assert "skip  extra.pt: refused: pickle" in res.stdout
    create = next(r for r in hub.requests if r.endpoint == "create_repo")
    assert "visibility" not in json.loads(create.body)  # no --private: the namespace default stands


def test_token_goes_only_into_the_authorization_header(adapter_dir: Path, tmp_path: Path) -> None:
    with FakeHub(token=TOKEN, lfs_suffixes=(".safetensors",)) as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm"], tmp_path, hub)
    assert res.returncode == 0, res.stderr
    api_calls = [r for r in hub.requests if r.endpoint != "lfs_put"]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    needle = TOKEN.encode()
    assert needle not in res.stdout.encode() + res.stderr.encode()
    for name, data in hub.commits[0].files.items():
        assert needle not in data, name
    for path, data in _all_bytes_under(tmp_path):  # the pushed dir and HF_HOME alike
        assert needle not in data, path
    assert all(needle not in r.body for r in hub.requests)


def test_dry_run_sends_nothing_and_needs_no_token(adapter_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm", "--dry-run"], tmp_path, hub, token=None)
    assert res.returncode == 0, res.stderr
    assert hub.requests == []
    for name in ADAPTER_FILES | EXTRA_FILES:  # all under 1 KB, so sizes print in bytes
        assert f"{(adapter_dir / name).stat().st_size} B  {name}\n" in res.stdout, name
    assert "README.md  (generated model card)" in res.stdout
    assert "total, 11 files" in res.stdout


def test_private_is_passed(adapter_dir: Path, tmp_path: Path) -> None:
    with FakeHub(token=TOKEN) as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm", "--private"], tmp_path, hub)
    assert res.returncode == 0, res.stderr
    create = next(r for r in hub.requests if r.endpoint == "create_repo")
    assert json.loads(create.body) == {"name": "rm", "organization": "me", "visibility": "private", "type": "model"}


def test_adapter_only_uploads_adapter_files(adapter_dir: Path, tmp_path: Path) -> None:
    with FakeHub(token=TOKEN) as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm", "--adapter-only"], tmp_path, hub)
    assert res.returncode == 0, res.stderr
    assert set(hub.commits[0].files) == ADAPTER_FILES | {"README.md"}
    assert "skip  metrics.json: not part of the adapter (--adapter-only)" in res.stdout


def test_adapter_only_on_export_is_an_error(export_dir: Path, tmp_path: Path) -> None:
    with FakeHub(token=TOKEN) as hub:
        res = run_push(["--path", str(export_dir), "--repo-id", "me/rm", "--adapter-only"], tmp_path, hub)
    assert res.returncode == 2 and "--adapter-only needs an adapter dir" in res.stderr
    assert hub.requests == []


def test_export_keeps_its_readme_and_goes_to_the_branch(export_dir: Path, tmp_path: Path) -> None:
    args = ["--path", str(export_dir), "--repo-id", "me/rm", "--revision", "dev", "--commit-message", "v1"]
    with FakeHub(token=TOKEN) as hub:
        res = run_push(args, tmp_path, hub)
    assert res.returncode == 0, res.stderr
    commit = hub.commits[0]
    assert (commit.revision, commit.summary) == ("dev", "v1")
    expected = {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"}
    assert set(commit.files) == expected | {"special_tokens_map.json", "vocab.txt"}
    assert all(data == (export_dir / name).read_bytes() for name, data in commit.files.items())
    assert hub.endpoints().index("branch") < hub.endpoints().index("commit")


def test_pickled_weights_are_refused(adapter_dir: Path, tmp_path: Path) -> None:
    (adapter_dir / "adapter_model.safetensors").unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with FakeHub(token=TOKEN) as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm"], tmp_path, hub)
    assert res.returncode == 2
    assert "no adapter_model.safetensors" in res.stderr and "adapter_model.bin" in res.stderr
    assert hub.requests == []


@pytest.mark.parametrize(("fail", "status"), [({"*": 401}, 401), ({"commit": 500}, 500)])
def test_hub_errors_are_one_clean_line(adapter_dir: Path, tmp_path: Path, fail: dict[str, int], status: int) -> None:
    with FakeHub(token=TOKEN, fail=fail) as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm"], tmp_path, hub)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and TOKEN not in res.stderr + res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("qrm push: error:")]
    assert len(errors) == 1 and f"HTTP {status}" in errors[0], res.stderr
    assert hub.commits == []


def test_missing_token_and_missing_dir(adapter_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm"], tmp_path, hub, token=None)
        assert res.returncode == 2 and "no Hugging Face token" in res.stderr
        res = run_push(["--path", str(tmp_path / "nope"), "--repo-id", "me/rm"], tmp_path, hub)
        assert res.returncode == 2 and "no such directory" in res.stderr
    assert hub.requests == []


def test_a_token_inside_the_dir_is_never_published(adapter_dir: Path, tmp_path: Path) -> None:
    (adapter_dir / "qrm_recipe.yaml").write_text(f"hub_token: {TOKEN}\n")
    with FakeHub(token=TOKEN) as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm"], tmp_path, hub)
    assert res.returncode == 2 and "qrm_recipe.yaml contains what looks like a Hugging Face token" in res.stderr
    assert TOKEN not in res.stderr + res.stdout
    assert hub.requests == []


def test_model_card(adapter_dir: Path, export_dir: Path) -> None:
    card = model_card(adapter_dir, repo_id="me/rm")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == BASE and meta["library_name"] == "peft"
    assert '"me/rm"' in card and "qrm_versions.json" in card and "eval_accuracy" in card
    (export_dir / "config.json").write_text(json.dumps({"_name_or_path": "/local/ckpt"}))
    card = model_card(export_dir)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in meta and meta["library_name"] == "transformers"  # a local path is no Hub id
    assert "`/local/ckpt`" in card and "AutoModelForSequenceClassification" in card


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_mode_names_the_variable_really_set(adapter_dir: Path, tmp_path: Path, variable: str) -> None:
    with FakeHub(token=TOKEN) as hub:
        res = run_push(["--path", str(adapter_dir), "--repo-id", "me/rm"], tmp_path, hub, extra_env={variable: "1"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip()
        == f"qrm push: error: {variable}=1 is set (offline mode); unset it to push (or use --dry-run)"
    )
    assert hub.requests == []
