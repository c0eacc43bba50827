"""export and generate: integer weights in safetensors, the same model back from the file, text from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dqt_lightning.cli import main
from dqt_lightning.tools.export import export_dqt
from dqt_lightning.tools.loading import load_exported, model_from_checkpoint
from dqt_lightning.quant.layers import DQTLinear
from dqt_lightning.commands import run as run_tool
from tests.trained import trained_runs  # noqa: F401 - a fixture

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(trained_runs) -> dict[str, Path]:
    """last.ckpt of the session's runs (tests/trained.py), read-only: export writes elsewhere."""
    return {run: trained_runs.checkpoint(run) for run in ("ternary", "bitnet-4bit", "fp", "8-to-ternary")}


TOKENS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("run,pack", [("ternary", True), ("ternary", False), ("bitnet-4bit", False), ("fp", False)])
def test_the_export_holds_integers_and_loads_back_to_the_same_model(checkpoints, run, pack, tmp_path):
    out = export_dqt(checkpoints[run], tmp_path / "export", pack=pack)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    quant = json.loads((out / "config.json").read_text())["quantization"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {key: f.get_tensor(key).dtype for key in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    projections = [k for k in dtypes if "_proj." in k and not k.endswith(".scale")]
    assert len(projections) == 7
    if run == "fp":
        assert quant["integer_weights"] == {} and all(dtypes[k] == torch.float32 for k in projections)
    else:
        assert len(quant["integer_weights"]) == 7
        want = torch.uint8 if pack else torch.int8
        assert all(dtypes[k] == want for k in projections), dtypes
        assert all(k.endswith("weight_packed") == pack for k in projections)
    trained, _ = model_from_checkpoint(checkpoints[run])
    loaded, tokenizer = load_exported(out)
    assert tokenizer is not None and tokenizer.vocab_size == 512
    assert (sum(isinstance(m, DQTLinear) for m in loaded.modules()) == 7) == (run != "fp")
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), trained(TOKENS), rtol=1e-5, atol=1e-5)


def test_bitnet_masters_are_exported_as_their_own_4bit_levels(checkpoints, tmp_path):
    out = export_dqt(checkpoints["bitnet-4bit"], tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = f.get_tensor("layers.0.attn.q_proj.weight")
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7 and int(q.abs().max()) > 1


def test_generate_samples_reproducibly_from_a_checkpoint_and_an_export(checkpoints, tmp_path, capsys):
    ckpt = checkpoints["ternary"]
    out = export_dqt(ckpt, tmp_path / "export", pack=True)
    texts = []
    for model in (str(ckpt), str(out), str(out)):
        assert run_tool(["generate", model, "--prompt", "The", "--max-new-tokens", "12", "--seed", "3"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("The") and len(texts[0]) > len("The\n")
    assert run_tool(["generate", str(out), "--prompt", "The", "--max-new-tokens", "12", "--ternary"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_a_run_directory_stands_for_its_last_checkpoint(trained_runs, tmp_path, capsys):
    run_dir = trained_runs.copy("ternary", tmp_path)  # export writes into it
    ckpt = run_dir / "checkpoints" / "last.ckpt"  # runs/ternary/version_0/checkpoints/last.ckpt
    texts = []
    for model in (ckpt, run_dir, ckpt.parent):
        assert run_tool(["generate", str(model), "--prompt", "The", "--max-new-tokens", "8", "--seed", "1"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2]
    with pytest.raises(SystemExit) as done:
        main(["export", str(run_dir)])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"[export] {run_dir / 'export'}: ")
    assert run_tool(["generate", str(run_dir / "export"), "--prompt", "The", "--max-new-tokens", "8",
                     "--seed", "1"]) == 0
    assert capsys.readouterr().out == texts[0]


def test_bad_paths_are_one_line_errors(tmp_path, capsys):
    assert run_tool(["generate", str(tmp_path / "missing.ckpt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'missing.ckpt'} does not exist"
    (tmp_path / "not-an-export").mkdir()
    assert run_tool(["generate", str(tmp_path / "not-an-export")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'not-an-export'} is neither an export (config.json "
                                               "and model.safetensors) nor a run directory (checkpoints/last.ckpt)")
    with pytest.raises(SystemExit) as done:
        main(["export", str(tmp_path / "not-an-export")])
    assert done.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: checkpoint {tmp_path / 'not-an-export'} is a directory without checkpoints/last.ckpt; "
        "name a .ckpt file")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as done:
        main(["export", str(tmp_path / "junk.ckpt")])
    assert done.value.code == 2 and "cannot be read" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("kept")
    with pytest.raises(SystemExit) as done:
        main(["export", str(tmp_path / "junk.ckpt"), "--output", str(tmp_path / "a-file")])
    assert done.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: --output {tmp_path / 'a-file'} is a file; give a directory to write the export into")
    assert (tmp_path / "a-file").read_text() == "kept"


@pytest.mark.parametrize("args,says", [(["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1; got -1"),
                                       (["--temperature", "-0.5"], "--temperature must be >= 0; got -0.5"),
                                       (["--top-k", "-3"], "--top-k must be >= 0; got -3")])
def test_bad_sampling_settings_are_refused_before_loading(tmp_path, capsys, args, says):
    assert run_tool(["generate", str(tmp_path / "missing.ckpt"), *args]) == 2
    assert capsys.readouterr().err == f"error: {says}\n"


def test_top_k_0_samples_among_every_token(checkpoints, capsys):
    # as Hugging Face's top_k=0: the same sample as a k that keeps the whole 512-token vocabulary
    samples = []
    for k in ("0", "512", "2"):
        args = ["--top-k", k, "--max-new-tokens", "20", "--temperature", "3"]
        assert run_tool(["generate", str(checkpoints["ternary"]), *args]) == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] != samples[2]


def test_pack_applies_to_weights_that_hold_only_ternary_levels(checkpoints, tmp_path):
    out = export_dqt(checkpoints["bitnet-4bit"], tmp_path / "export", pack=True)  # 4-bit levels: nothing to pack
    assert json.loads((out / "config.json").read_text())["quantization"]["packed"] == {}
    loaded, _ = load_exported(out)
    trained, _ = model_from_checkpoint(checkpoints["bitnet-4bit"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), trained(TOKENS), rtol=1e-5, atol=1e-5)


def test_a_schedule_run_exports_the_grid_it_ended_on(checkpoints, tmp_path):
    # Its config.yaml says 8 bits; from step 4 of 6 its weights are ternary, and the export must say so.
    out = export_dqt(checkpoints["8-to-ternary"], tmp_path / "export", pack=True)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 8.0 and set(quantization["integer_weights"].values()) == {1.58}
    assert set(quantization["packed"]) == set(quantization["integer_weights"])
    loaded, _ = load_exported(out)
    trained, _ = model_from_checkpoint(checkpoints["8-to-ternary"])
    assert all(layer.grid.is_ternary for layer in trained.modules() if isinstance(layer, DQTLinear))
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), trained(TOKENS), rtol=1e-5, atol=1e-5)
