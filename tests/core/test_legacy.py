"""Legacy formats: detected without unpickling, read with opt-in, refused without it."""

from __future__ import annotations

import json
import pickle
import pickletools
import struct
import zipfile

import pytest
import torch

from analysis_helpers import PRUNED_TOTAL, Tok, base_and_pruned, state_dict_copy, tiny
from analysis.structure import structure_of
from core.models import legacy
from core.models.checkpoint import save_checkpoint
from core.models.legacy import PickleNotAllowed, detect_format, load_legacy, scan_pickle
from core.models.load import load_as_model
from core.run.errors import LoadError
from core.models.llama import count_params
from core.models.slicegpt import save_slicegpt
from pruning.slicegpt import SliceGPT


def sliced_tiny():
    """The tiny base sliced by SliceGPT to 48 of 64 hidden dims (deterministic), with SliceGPT's RMSN eps 1e-5."""
    model, _ = tiny()
    model.config.rms_norm_eps = 1e-5
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-5
    calib = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    SliceGPT(sparsity=0.25, progress=False)(model, calib)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    _, pruned, tok = base_and_pruned()
    (root / "bundle").mkdir()
    torch.save({"model": pruned, "tokenizer": Tok(), "method": "taylor"}, root / "bundle" / "pytorch_model.bin")
    (root / "bundle2").mkdir()
    torch.save({"model": pruned, "tokenizer": Tok()}, root / "bundle2" / "pruned_model.bin")
    (root / "whole").mkdir()
    torch.save(pruned, root / "whole" / "model.pt")
    (root / "sd").mkdir()
    torch.save(state_dict_copy(pruned), root / "sd" / "weights.pt")
    (root / "sd_cfg").mkdir()
    torch.save(state_dict_copy(pruned), root / "sd_cfg" / "weights.pt")
    cfg = pruned.config.to_dict()
    cfg["layer_configs"] = [{"num_attention_heads": h, "num_key_value_heads": k, "intermediate_size": i}
                            for h, k, i in ((8, 2, 128), (4, 1, 96), (8, 2, 96), (8, 2, 128))]
    (root / "sd_cfg" / "config.json").write_text(json.dumps(cfg))
    save_slicegpt(sliced_tiny(), root / "slice", "Llama", 0.25)  # + the base's config.json, as run_slicegpt.py
    (root / "evals").mkdir()
    (root / "evals" / "evaluation_results.json").write_text("{}")
    save_checkpoint(pruned, tok, root / "ckpt", {"method": "known"})
    return root, pruned


def test_detect_without_unpickling(files, monkeypatch):
    root, _ = files
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("detection must not unpickle"))
    kinds = {d: detect_format(root / d).kind for d in
             ("bundle", "bundle2", "whole", "sd", "slice", "evals", "ckpt")}
    assert kinds == {"bundle": "pickle_bundle", "bundle2": "pickle_bundle", "whole": "whole_model_pt",
                     "sd": "state_dict_pt", "slice": "slicegpt", "evals": "eval_only", "ckpt": "prunelab"}
    assert detect_format(root / "slice").config_path.name == "Llama_0.25.json"
    assert "evaluation_results.json" in detect_format(root / "evals").reason
    assert detect_format(root / "nope").kind == "unknown"
    assert "LlamaForCausalLM" in " ".join(scan_pickle(root / "whole" / "model.pt").globals)


@pytest.mark.parametrize("d", ["bundle", "whole"])
def test_full_pickles_refused_without_opt_in(files, d, monkeypatch):
    """Loading a bundle needs the opt-in; analysing it does not: the restricted reader runs none of its code."""
    root, _ = files
    with pytest.raises(PickleNotAllowed) as e:
        load_legacy(root / d)
    msg = str(e.value)
    assert "allow_pickle=true" in msg and "arbitrary code" in msg
    assert isinstance(e.value, LoadError)
    with pytest.raises(PickleNotAllowed):
        load_as_model(root / d)
    modes = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: modes.append((k.get("weights_only"), k.get("pickle_module")))
                        or real_load(*a, **k))
    s = structure_of(root / d, name=d)
    assert modes == [(False, legacy.RESTRICTED_PICKLE)]  # never torch's own full unpickler
    assert s.total_params == PRUNED_TOTAL and s.format == detect_format(root / d).kind
    assert s.class_names == {"attention": "LlamaAttention", "mlp": "LlamaMLP"}


def test_restricted_read_equals_full_unpickle(files):
    """The restricted reader gives the tensors a full unpickle gives, under the state_dict() names."""
    root, pruned = files
    full = load_legacy(root / "bundle", allow_pickle=True)
    lm = legacy.read_restricted(root / "bundle")
    assert lm.kind == "pickle_bundle" and lm.meta == {"method": "taylor"} and lm.model is None
    want = full.model.state_dict()
    assert list(lm.state_dict) == list(want)
    assert all(torch.equal(lm.state_dict[k], want[k]) for k in want)
    assert lm.config["num_attention_heads"] == 8 and lm.config["model_type"] == "llama"
    assert lm.module_classes["model.layers.1.self_attn"].endswith("modeling_llama.LlamaAttention")


@pytest.mark.parametrize("d", ["bundle", "bundle2", "whole"])
def test_full_pickles_read_with_opt_in(files, d, caplog):
    root, pruned = files
    lm = load_legacy(root / d, allow_pickle=True)
    assert isinstance(lm.model, torch.nn.Module) and "unpickling" in caplog.text
    if d == "bundle":
        assert isinstance(lm.tokenizer, Tok) and lm.meta == {"method": "taylor"}
    s = structure_of(root / d, name=d, allow_pickle=True)
    assert s.total_params == PRUNED_TOTAL and s.layers[1].num_heads == 4 and s.format == lm.kind


def test_state_dicts_are_safe_and_need_no_opt_in(files):
    root, pruned = files
    lm = load_legacy(root / "sd")
    assert lm.model is None and set(lm.state_dict) == set(pruned.state_dict())
    s = structure_of(root / "sd", name="sd", fallback_config=pruned.config.to_dict())
    assert s.total_params == PRUNED_TOTAL and s.layers[1].num_kv_heads == 1
    model, tok = load_as_model(root / "sd_cfg")  # config.json with layer_configs beside it
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pruned(ids).logits)
    with pytest.raises(LoadError, match="without a config.json"):
        load_as_model(root / "sd")


def test_slicegpt_structure_has_rotations_and_loads(files, tmp_path):
    root, _ = files
    s = structure_of(root / "slice", name="slice")
    ref = sliced_tiny()
    assert s.format == "slicegpt" and s.total_params == count_params(ref)
    layers = s.to_json()["layers"]
    assert layers[0]["extra"]["attn_shortcut_Q"] == {"params": 48 * 48, "shape": [48, 48]}
    assert layers[3]["extra"]["mlp_shortcut_Q"]["shape"] == [48, 64] and layers[0]["attention"]["num_heads"] == 8
    model, _ = load_as_model(root / "slice")  # no slicegpt package, no unpickling of code
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    (tmp_path / "slice").mkdir()
    for name in ("Llama_0.25.pt", "Llama_0.25.json"):  # SliceGPT copies the base config only for a local model
        (tmp_path / "slice" / name).write_bytes((root / "slice" / name).read_bytes())
    with pytest.raises(LoadError, match="no config.json beside it.*base="):
        load_as_model(tmp_path / "slice")


def test_corrupt_pickle(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a pickle at all")
    info = detect_format(tmp_path)
    assert info.kind == "unknown" and "not a readable torch file" in info.reason
    with pytest.raises(LoadError, match="not a model"):
        load_legacy(tmp_path)


# --------------------------------------------------------------------------- memoised globals, refusal messages

LLAMA_MOD = "transformers.models.llama.modeling_llama"
# "kernels": transformers >= 5.25 pickles hub-kernel layers of a whole model through kernels._internals
_KNOWN_TOP = {"torch", "transformers", "kernels", "collections", "analysis_helpers", "builtins", "__builtin__"}


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("protocol", [2, 4])
def test_scan_resolves_memoised_module_names(files, tmp_path, protocol, zip_format):
    """Protocol 4 writes a repeated module name once, then re-fetches it from the memo (BINGET)."""
    _, pruned = files
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": pruned, "tokenizer": Tok()}, path, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zip_format)
    scan = scan_pickle(path)
    assert scan.zip_format is zip_format
    assert {"analysis_helpers.Tok", f"{LLAMA_MOD}.LlamaForCausalLM", f"{LLAMA_MOD}.LlamaAttention",
            f"{LLAMA_MOD}.LlamaMLP", f"{LLAMA_MOD}.LlamaRMSNorm", "torch._utils._rebuild_tensor_v2",
            "torch.nn.modules.linear.Linear"} <= scan.globals
    assert {g.split(".")[0] for g in scan.globals} <= _KNOWN_TOP, scan.globals  # no "mlp.LlamaMLP"-like guesses
    assert scan.needs_full_unpickle and detect_format(path).kind == "pickle_bundle"
    if protocol == 4 and zip_format:  # the premise: the module name is a literal once, so 5 classes reach it via memo
        raw = zipfile.ZipFile(path).read(next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl")))
        assert sum(arg == LLAMA_MOD for _, arg, _ in pickletools.genops(raw)) == 1


@pytest.mark.parametrize("protocol", [2, 4])
def test_scan_not_fooled_by_decoy_strings(tmp_path, protocol):
    """The last two literal strings before STACK_GLOBAL spell torch.Size; the real global is analysis_helpers.Tok."""
    path = tmp_path / "weights.pt"
    torch.save({"analysis_helpers": 0, "Tok": 0, "torch": 0, "Size": Tok()}, path, pickle_protocol=protocol)
    scan = scan_pickle(path)
    assert scan.globals == {"analysis_helpers.Tok"}
    assert scan.needs_full_unpickle and detect_format(path).kind == "whole_model_pt"


def _u(s: str) -> bytes:  # SHORT_BINUNICODE
    return b"\x8c" + bytes([len(s)]) + s.encode()


def _bu(s: str) -> bytes:  # BINUNICODE
    return b"X" + struct.pack("<I", len(s)) + s.encode()


# [module, name, decoy module, decoy name, <the global built from memoised module and name>()]
_DECOYS = ("torch._utils", "_rebuild_tensor_v2")
CRAFTED = {
    # protocol 4: MEMOIZE (implicit index = entries so far), BINGET
    "memoize_binget": (b"\x80\x04]\x94(" + _u("analysis_helpers") + b"\x94" + _u("Tok") + b"\x94"
                       + _u(_DECOYS[0]) + b"\x94" + _u(_DECOYS[1]) + b"\x94"
                       + b"h\x01h\x02\x93\x94)\x81e."),
    # explicit BINPUT / LONG_BINPUT indices out of order, LONG_BINGET, BINUNICODE
    "binput_long_binget": (b"\x80\x02]q\x00(" + _bu("analysis_helpers") + b"r" + struct.pack("<I", 300)
                           + _bu("Tok") + b"q\x07" + _bu(_DECOYS[0]) + b"q\x08" + _bu(_DECOYS[1]) + b"q\x09"
                           + b"j" + struct.pack("<I", 300) + b"j" + struct.pack("<I", 7) + b"\x93)\x81e."),
    # text PUT / GET, UNICODE; a MARK popped by POP, and the name DUP'ed then POP'ed before STACK_GLOBAL
    "put_get_text": (b"(lp0\n(Vanalysis_helpers\np1\nVTok\np2\n" + b"V" + _DECOYS[0].encode() + b"\np3\n"
                     + b"V" + _DECOYS[1].encode() + b"\np4\ng1\n(0g2\n20\x93)\x81e."),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_scan_crafted_memo_pickles(tmp_path, name):
    raw = CRAFTED[name]
    loaded = pickle.loads(raw)  # the premise: a valid pickle whose last item is a Tok, under decoy strings
    assert loaded[:4] == ["analysis_helpers", "Tok", *_DECOYS] and isinstance(loaded[4], Tok)
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:  # laid out as torch.save lays out its zip
        zf.writestr("archive/data.pkl", raw)
        zf.writestr("archive/version", "3\n")
    scan = scan_pickle(path)
    assert scan.globals == {"analysis_helpers.Tok"}
    assert scan.needs_full_unpickle and detect_format(path).kind == "whole_model_pt"


def test_plain_state_dicts_still_state_dicts(files, tmp_path, caplog):
    _, pruned = files
    path = tmp_path / "weights.pt"
    rebuild = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}
    for protocol in (2, 4):
        torch.save(pruned.state_dict(), path, pickle_protocol=protocol)
        scan = scan_pickle(path)
        assert scan.globals == rebuild and not scan.needs_full_unpickle, protocol
        assert detect_format(path).kind == "state_dict_pt", protocol
    torch.save(state_dict_copy(pruned), path)  # torch's default protocol (2): read safely, no opt-in
    lm = load_legacy(path)
    assert lm.kind == "state_dict_pt" and set(lm.state_dict) == set(pruned.state_dict())
    assert not _unpickle_warnings(caplog, path)


def test_protocol_4_state_dict_refusal_says_why(files, tmp_path, caplog):
    """torch's tensors-only loader reads protocol 2 only; the refusal must not call the file 'not a state dict'."""
    _, pruned = files
    path = tmp_path / "weights.pt"
    torch.save(state_dict_copy(pruned), path, pickle_protocol=4)
    assert detect_format(path).kind == "state_dict_pt"
    with pytest.raises(PickleNotAllowed) as e:
        load_legacy(path)
    msg = str(e.value)
    assert "opcode FRAME, pickle protocol 4" in msg and "allow_pickle=true" in msg
    assert "not a plain state dict" not in msg and "weights_only" not in msg
    lm = load_legacy(path, allow_pickle=True)
    assert lm.kind == "state_dict_pt" and set(lm.state_dict) == set(pruned.state_dict())
    assert len(_unpickle_warnings(caplog, path)) == 1


def _unpickle_warnings(caplog, path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "core.models.legacy"
            and r.getMessage().startswith(f"unpickling {path} (allow_pickle=true)")]


def test_state_dict_with_a_non_tensor_global(files, tmp_path, caplog):
    """torch.optim.* passes the scan's torch. prefix, but weights_only=True refuses it."""
    _, pruned = files
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state_dict_copy(pruned), "optimizer": torch.optim.SGD}, path)
    assert "torch.optim.sgd.SGD" in scan_pickle(path).globals
    assert detect_format(path).kind == "state_dict_pt"  # the premise: detected as a state dict
    with pytest.raises(PickleNotAllowed) as e:
        load_legacy(path)
    msg = str(e.value)
    assert "allow_pickle=true" in msg and "torch.optim.sgd.SGD" in msg and "weights_only" not in msg
    assert not _unpickle_warnings(caplog, path)
    lm = load_legacy(path, allow_pickle=True)
    assert lm.kind == "state_dict_pt" and set(lm.state_dict) == set(pruned.state_dict())
    assert len(_unpickle_warnings(caplog, path)) == 1


def test_misdetected_bundle_falls_back_to_full_unpickle(files, monkeypatch, caplog):
    """A bundle the detection took for a state dict: refused truly without opt-in, unpickled with it."""
    root, _ = files
    path = root / "bundle" / "pytorch_model.bin"
    monkeypatch.setattr(legacy, "classify_pickle", lambda p: ("state_dict_pt", "state dict (tensors only)"))
    assert detect_format(path).kind == "state_dict_pt"
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k["weights_only"]) or real_load(*a, **k))
    with pytest.raises(PickleNotAllowed) as e:
        load_legacy(path)
    msg = str(e.value)
    assert "not a plain state dict" in msg and "allow_pickle=true" in msg and "weights_only" not in msg
    assert loads == [True]
    lm = load_legacy(path, allow_pickle=True)
    assert loads == [True, True, False]
    assert lm.kind == "pickle_bundle" and isinstance(lm.model, torch.nn.Module) and isinstance(lm.tokenizer, Tok)
    assert lm.meta == {"method": "taylor"} and len(_unpickle_warnings(caplog, path)) == 1


def test_scan_unresolvable_stack_global_needs_full_unpickle(tmp_path):
    """A STACK_GLOBAL whose module is no string the scan can see is never taken for a state dict."""
    raw = b"\x80\x04" + _u(_DECOYS[0]) + _u(_DECOYS[1]) + b"h\x05" + _u("Tok") + b"\x93."  # memo 5 never set
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", raw)
    scan = scan_pickle(path)
    assert scan.globals == {legacy.UNRESOLVED_GLOBAL} and scan.needs_full_unpickle
