"""The block-diff checkpoint writer: round trips, stock-transformers loading, bytes written per step, layout
changes, refused paths, full disks, and SIGKILLs at random instants of syncs (old or new, never a mix).

Tiny tensors only; no vLLM. The SIGKILL test forks sync loops from one helper process (torch imported
once) and kills them at random delays."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from plasticity_training import checkpoint as ck
from plasticity_training import checkpoint_io as ck_io
from plasticity_training.checkpoint import (CheckpointBusyError, CheckpointDiskFullError, CheckpointPathError,
                                            CheckpointWriteError, checkpoint_info, hf_tensors, load_checkpoint_state,
                                            plan_layout, sync_checkpoint)
from plasticity_training.hf_view import build_hf_view, token_logprobs
from tiny_models import TEXT, tiny, vllm_layout  # noqa: F401 (tiny is a fixture)

IDS = [5, 17, 42, 99, 7, 250, 3, 64]
BS = 4096


def load_current(ckpt: Path) -> dict[str, torch.Tensor]:
    """What a user loads: the files the index of `<ckpt>/current` names, read with safetensors."""
    gen = Path(os.path.realpath(ckpt / "current"))
    files = set(json.loads((gen / "model.safetensors.index.json").read_text())["weight_map"].values())
    out = {}
    for f in sorted(files):
        out.update(load_file(str(gen / f)))
    return out


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)):
            return False
    return True


def source_dir(tmp_path: Path) -> Path:
    d = tmp_path / "source"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"model_type": "llama"}\n')
    return d


def layer_bytes(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if n.startswith(prefix))


# ---- round trip and layout ----------------------------------------------------------------------


def test_round_trip_is_bitwise_and_layout_is_deterministic(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a.f32": torch.randn(33, 17, generator=g),
        "b.bf16": torch.randn(100, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(5, 3, 2, generator=g).to(torch.float16),
        "d.i64": torch.arange(7),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.u8": torch.arange(11, dtype=torch.uint8),
        "i.strided": torch.randn(8, 6, generator=g).t(),  # not contiguous
    }
    report = sync_checkpoint(tensors, tmp_path / "ck", source_dir(tmp_path))
    assert report.full_rewrite and report.generation == 1 and report.path == (tmp_path / "ck").resolve() / "current"
    assert bitwise_equal(load_current(tmp_path / "ck"), tensors)
    with safe_open(str(report.path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # Same names/dtypes/shapes, other values -> the same header bytes; data starts on a block boundary.
    other = {k: torch.zeros_like(v) for k, v in tensors.items()}
    h1, h2 = plan_layout(tensors)[0].header, plan_layout(other)[0].header
    assert h1 == h2 and len(h1) % BS == 0


def test_known_answer_blocks_changed_follow_the_two_generations(tmp_path):
    """A/B: a sync writes the blocks changed in the last two syncs, exactly (one f32 tensor, 16 blocks)."""
    w = torch.zeros(16 * BS // 4)
    src, ckpt = source_dir(tmp_path), tmp_path / "ck"
    first = sync_checkpoint({"w": w}, ckpt, src)
    data0 = len(plan_layout({"w": w})[0].header)  # the file offset of w[0]
    assert first.blocks_total == 17 and first.weight_bytes_written == 17 * BS
    assert sync_checkpoint({"w": w}, ckpt, src).weight_bytes_written == 0  # nothing changed
    w[5 * BS // 4] = 1.0  # block 5 of the data
    r1 = sync_checkpoint({"w": w}, ckpt, src)
    assert (r1.blocks_changed, r1.weight_bytes_written) == (1, BS)
    w[9 * BS // 4 + 3] = 2.0  # block 9
    r2 = sync_checkpoint({"w": w}, ckpt, src)  # standby is two syncs old: blocks 5 and 9
    assert (r2.blocks_changed, r2.weight_bytes_written) == (2, 2 * BS)
    r3 = sync_checkpoint({"w": w}, ckpt, src)  # no change: the standby catches up on block 9
    assert r3.blocks_changed == 1
    r4 = sync_checkpoint({"w": w}, ckpt, src)
    assert r4.blocks_changed == 0 and r4.weight_bytes_written == 0 and r4.bytes_written < BS
    assert data0 % BS == 0 and bitwise_equal(load_current(ckpt), {"w": w})


# ---- the HF view: transformers loads it, bytes per step ----------------------------------------


def test_checkpoint_of_the_hf_view_loads_in_transformers_with_same_logprobs(tiny, tmp_path):
    import transformers

    weights = vllm_layout(tiny, pad_vocab_to=320)
    view = build_hf_view(tiny, weights)
    with torch.no_grad():  # a "training step" through the view: lands in vLLM's fused tensors
        view.model.layers[0].self_attn.k_proj.weight.add_(0.01)
        view.model.layers[1].mlp.up_proj.weight.mul_(1.1)
    tensors = hf_tensors(view)
    assert "model.layers.0.self_attn.k_proj.weight" in tensors and not any("qkv" in n for n in tensors)
    assert tensors["model.embed_tokens.weight"].shape[0] == 300  # vocab padding cut off
    report = sync_checkpoint(tensors, tmp_path / "ck", tiny, extra_files={"trainer_state.json": b'{"step": 1}'})
    stock = transformers.AutoModelForCausalLM.from_pretrained(report.path, dtype=torch.float32).eval()
    assert token_logprobs(stock, IDS) == token_logprobs(view, IDS)  # same weights, same maths: exact
    assert bitwise_equal({k: v for k, v in stock.state_dict().items()}, {k: v for k, v in tensors.items()})
    tok = transformers.AutoTokenizer.from_pretrained(report.path)
    assert tok("the cat")["input_ids"] == transformers.AutoTokenizer.from_pretrained(tiny)("the cat")["input_ids"]
    assert transformers.GenerationConfig.from_pretrained(report.path).do_sample is False
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (report.path / name).read_bytes() == (tiny / name).read_bytes()
    assert not list(report.path.glob("*.bin"))
    assert load_checkpoint_state(tmp_path / "ck") == {"trainer_state.json": b'{"step": 1}'}


def test_one_layer_step_writes_that_layer_and_no_change_writes_nothing(tiny, tmp_path):
    view = build_hf_view(tiny, vllm_layout(tiny))
    tensors = hf_tensors(view)
    model_bytes = layer_bytes(tensors, "")
    one_layer = layer_bytes(tensors, "model.layers.1.")
    ckpt = tmp_path / "ck"
    first = sync_checkpoint(tensors, ckpt, tiny)
    assert first.full_rewrite and first.weight_bytes_written >= model_bytes
    second = sync_checkpoint(hf_tensors(view), ckpt, tiny)  # no change
    assert second.weight_bytes_written == 0 and second.bytes_written < 1024 and not second.full_rewrite
    for step in range(3):  # a step that changes every tensor of layer 1 (through the views), then sync
        with torch.no_grad():
            for p in view.model.layers[1].parameters():
                p.add_(0.001 * (step + 1))
        r = sync_checkpoint(hf_tensors(view), ckpt, tiny)
        # that layer's bytes, plus at most the two blocks its run of tensors shares with neighbours
        assert one_layer <= r.weight_bytes_written <= one_layer + 2 * BS, r
        assert r.bytes_written <= r.weight_bytes_written + 4096  # + index/manifest
        assert r.weight_bytes_written < model_bytes / 2
    catch_up = sync_checkpoint(hf_tensors(view), ckpt, tiny)  # the standby still lacks the last step
    assert catch_up.weight_bytes_written <= one_layer + 2 * BS
    idle = sync_checkpoint(hf_tensors(view), ckpt, tiny)
    assert idle.weight_bytes_written == 0
    assert bitwise_equal(load_current(ckpt), {k: v for k, v in hf_tensors(view).items()})


def test_tied_embeddings_leave_out_lm_head(tiny, tmp_path):
    import transformers

    tied_dir = tmp_path / "tied"
    shutil.copytree(tiny, tied_dir)
    config = json.loads((tied_dir / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied_dir / "config.json").write_text(json.dumps(config))
    weights = vllm_layout(tiny)
    del weights["lm_head.weight"]  # vLLM has one tensor for both
    view = build_hf_view(tied_dir, weights)
    tensors = hf_tensors(view)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    report = sync_checkpoint(tensors, tmp_path / "ck", tied_dir)
    assert "lm_head.weight" not in load_current(tmp_path / "ck")
    stock = transformers.AutoModelForCausalLM.from_pretrained(report.path, dtype=torch.float32).eval()
    assert stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()
    assert token_logprobs(stock, IDS) == token_logprobs(view, IDS)


def test_changed_tensor_set_or_dtype_forces_full_rewrite(tmp_path):
    src, ckpt = source_dir(tmp_path), tmp_path / "ck"
    base = {f"layer.{i}": torch.randn(64, 64) for i in range(4)}
    sync_checkpoint(base, ckpt, src)
    grown = {**base, "layer.4": torch.randn(64, 64)}
    r = sync_checkpoint(grown, ckpt, src)
    assert r.full_rewrite and r.weight_bytes_written == plan_layout(grown)[0].size
    assert bitwise_equal(load_current(ckpt), grown)
    again = sync_checkpoint(grown, ckpt, src)  # the other generation still has the old layout
    assert again.full_rewrite
    assert sync_checkpoint(grown, ckpt, src).weight_bytes_written == 0
    half = {k: v.to(torch.bfloat16) for k, v in grown.items()}
    r = sync_checkpoint(half, ckpt, src)
    assert r.full_rewrite and bitwise_equal(load_current(ckpt), half)
    assert not list(ckpt.rglob("*" + ck.TMP_SUFFIX))


def test_shards_and_index(tmp_path):
    src, ckpt = source_dir(tmp_path), tmp_path / "ck"
    tensors = {f"t.{i}": torch.randn(32, 32) for i in range(6)}  # 4 KiB each
    seen = []
    r = sync_checkpoint(tensors, ckpt, src, max_shard_bytes=10_000, progress=lambda done, total: seen.append((done, total)))
    total = sum(p.size for p in plan_layout(tensors, max_shard_bytes=10_000))
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    files = sorted(p.name for p in r.path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((r.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == 6 * 4096
    assert bitwise_equal(load_current(ckpt), tensors)
    r = sync_checkpoint(tensors, ckpt, src)  # back to one file: the stale shards leave that generation
    assert sorted(p.name for p in r.path.glob("*.safetensors")) == ["model.safetensors"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_round_trip(tmp_path):
    src, ckpt = source_dir(tmp_path), tmp_path / "ck"
    tensors = {f"t.{i}": torch.randn(300, 77, device="cuda", dtype=torch.bfloat16) for i in range(3)}
    sync_checkpoint(tensors, ckpt, src)
    tensors["t.1"][5] += 1
    r = sync_checkpoint(tensors, ckpt, src)
    assert r.weight_bytes_written <= 2 * BS
    assert bitwise_equal(load_current(ckpt), {k: v.cpu() for k, v in tensors.items()})


# ---- refusals and failures ----------------------------------------------------------------------


def test_paths_outside_the_allowed_root_or_into_the_model_are_refused(tiny, tmp_path):
    tensors = {"w": torch.ones(4)}
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(CheckpointPathError, match="outside the allowed root"):
        sync_checkpoint(tensors, tmp_path / "elsewhere", tiny, allowed_root=root)
    (root / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CheckpointPathError, match="outside the allowed root"):
        sync_checkpoint(tensors, root / "escape" / "ck", tiny, allowed_root=root)
    with pytest.raises(CheckpointPathError, match="outside the allowed root"):
        sync_checkpoint(tensors, root / ".." / "ck2", tiny, allowed_root=root)
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "ck2").exists()
    assert sync_checkpoint(tensors, root / "ck", tiny, allowed_root=root).path.is_dir()
    # The served model's own directory: only with the explicit setting, and its files are left alone.
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    with pytest.raises(CheckpointPathError, match="allow_model_dir"):
        sync_checkpoint(tensors, model, model)
    with pytest.raises(CheckpointPathError, match="allow_model_dir"):
        sync_checkpoint(tensors, model / "ckpt", model)
    r = sync_checkpoint(tensors, model, model, allow_model_dir=True)
    assert r.path == model.resolve() / "current" and bitwise_equal(load_current(model), tensors)
    assert all((model / n).read_bytes() == b for n, b in before.items())
    # A non-empty directory that is not a checkpoint.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointPathError, match="not a plasticity checkpoint"):
        sync_checkpoint(tensors, foreign, tiny)


def tree_bytes(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under `root`: what "left exactly as it was" means."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def test_another_models_sync_into_a_checkpoint_is_refused_and_leaves_it_byte_identical(tmp_path):
    first, second = source_dir(tmp_path), tmp_path / "second"
    second.mkdir()
    (second / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}\n')
    ckpt = tmp_path / "ckpts" / "main"
    sync_checkpoint({"w": torch.ones(64)}, ckpt, first, extra_files={"optimizer.safetensors": b"first's state"})
    sync_checkpoint({"w": torch.full((64,), 2.0)}, ckpt, first)  # both generations hold the first model's work
    before = tree_bytes(ckpt)
    with pytest.raises(ck.CheckpointOriginError, match=re.escape(f"'source' ({first.resolve()}), these from 'second'")):
        sync_checkpoint({"w": torch.zeros(64)}, ckpt, second)  # same tensor names and shapes, another model
    assert tree_bytes(ckpt) == before
    assert checkpoint_info(ckpt)["origin"] == str(first.resolve())
    # Asked for: the other model's weights replace them (and carry their own origin from then on).
    r = sync_checkpoint({"w": torch.zeros(64)}, ckpt, second, replace=True)
    assert r.generation == 3 and bitwise_equal(load_current(ckpt), {"w": torch.zeros(64)})
    assert checkpoint_info(ckpt)["origin"] == str(second.resolve())


def test_a_server_resuming_from_a_checkpoint_syncs_back_into_it_and_keeps_its_origin(tmp_path):
    model = source_dir(tmp_path)
    ckpt = tmp_path / "ckpts" / "main"
    sync_checkpoint({"w": torch.ones(64)}, ckpt, model)
    served = ckpt / "current"  # `plasticity serve <ckpt>` serves this: its origin is the checkpoint's
    assert ck.model_origin(served) == ck.model_origin(ckpt) == str(model.resolve())
    origin = ck.model_origin(served)  # read once at start, as the trainer does
    for value, generation in ((2.0, 2), (3.0, 3)):
        r = sync_checkpoint({"w": torch.full((64,), value)}, ckpt, served, origin=origin)
        assert r.generation == generation and checkpoint_info(ckpt)["origin"] == str(model.resolve())
    sync_checkpoint({"w": torch.full((64,), 4.0)}, ckpt, model)  # the original model may still write it too
    # Another checkpoint of the same model is a sibling, not another model: a copy resumed elsewhere can return.
    copy = tmp_path / "ckpts" / "copy"
    sync_checkpoint({"w": torch.full((64,), 5.0)}, copy, ckpt / "current")
    sync_checkpoint({"w": torch.full((64,), 6.0)}, ckpt, copy / "current")
    assert bitwise_equal(load_current(ckpt), {"w": torch.full((64,), 6.0)})


def _two_sets():
    g = torch.Generator().manual_seed(3)
    old = {f"w.{i}": torch.randn(128, 256, generator=g) for i in range(4)}
    new = {k: v + 1.0 for k, v in old.items()}
    return old, new


@pytest.mark.parametrize("where", ["block write", "full write", "state file"])
def test_disk_full_keeps_the_previous_checkpoint_and_the_next_sync_recovers(tmp_path, monkeypatch, where):
    src, ckpt = source_dir(tmp_path), tmp_path / "ck"
    old, new = _two_sets()
    sync_checkpoint(old, ckpt, src, extra_files={"s": b"old"}, seed_standby=(where != "full write"))
    target = {"block write": (ck_io, "pwrite_all"), "full write": (os, "posix_fallocate"),
              "state file": (ck, "write_small")}[where]
    calls = []
    real = getattr(*target)

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 2 or where == "full write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, full_disk)
    with pytest.raises(CheckpointDiskFullError, match="previous checkpoint is intact"):
        sync_checkpoint(new, ckpt, src, extra_files={"s": b"new"})
    monkeypatch.undo()
    assert bitwise_equal(load_current(ckpt), old) and load_checkpoint_state(ckpt) == {"s": b"old"}
    assert checkpoint_info(ckpt)["generation"] == 1
    if where == "full write":  # the half-written temporary file is gone, its space freed
        assert not list(ckpt.rglob("*" + ck.TMP_SUFFIX))
    r = sync_checkpoint(new, ckpt, src, extra_files={"s": b"new"})  # repairs the half-written standby
    assert bitwise_equal(load_current(ckpt), new) and load_checkpoint_state(ckpt) == {"s": b"new"}
    assert r.generation == 2


def test_unwritable_target_and_busy_lock(tmp_path, monkeypatch):
    src = source_dir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError):
        sync_checkpoint({"w": torch.ones(4)}, blocker / "ck", src)  # parent is not a directory
    ckpt = tmp_path / "ck"
    old, new = _two_sets()
    sync_checkpoint(old, ckpt, src)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ck_io, "pwrite_all", denied)  # as root chmod does not bite: simulate EACCES
    with pytest.raises(CheckpointWriteError, match="not writable"):
        sync_checkpoint(new, ckpt, src)
    monkeypatch.undo()
    assert bitwise_equal(load_current(ckpt), old)
    if os.geteuid() != 0:
        os.chmod(ckpt, 0o555)
        try:
            with pytest.raises(CheckpointWriteError):
                sync_checkpoint(new, ckpt, src)
        finally:
            os.chmod(ckpt, 0o755)
        assert bitwise_equal(load_current(ckpt), old)
    fd = os.open(ckpt / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CheckpointBusyError):
            sync_checkpoint(new, ckpt, src)
    finally:
        os.close(fd)
    assert bitwise_equal(load_current(ckpt), old)


# ---- SIGKILL at random instants -----------------------------------------------------------------

WRITER = r'''
import json, os, sys, traceback
import torch
torch.set_num_threads(1)  # no OpenMP pool in this process: forking it is safe
from safetensors.torch import save_file
import plasticity_training.checkpoint as ck
from plasticity_training.checkpoint import sync_checkpoint

ck.WINDOW_BYTES = 1 << 18  # many windows per sync: kills land between block writes too
root = sys.argv[1]
g = torch.Generator().manual_seed(7)
base = {f"model.layers.{i}.w": torch.randn(256, 1024, generator=g) for i in range(6)}  # 6 MiB
base["model.norm.weight"] = torch.randn(1000, generator=g)
base["model.embed.bf16"] = torch.randn(512, 512, generator=g).to(torch.bfloat16)
sets = [base, dict(base), dict(base)]
for i in (0, 2, 4):  # set 1: three whole tensors differ
    sets[1][f"model.layers.{i}.w"] = base[f"model.layers.{i}.w"] + 1
sets[2]["model.layers.1.w"] = base["model.layers.1.w"].clone()
sets[2]["model.layers.1.w"][10:60] += 2  # set 2: a few rows of one tensor, the norm, half the bf16
sets[2]["model.norm.weight"] = base["model.norm.weight"] * 3
sets[2]["model.embed.bf16"] = torch.cat([base["model.embed.bf16"][:256], -base["model.embed.bf16"][256:]])
for i, s in enumerate(sets):
    save_file(s, os.path.join(root, f"ref-{i}.safetensors"))
src = os.path.join(root, "source")
os.makedirs(src, exist_ok=True)
with open(os.path.join(src, "config.json"), "w") as f:
    f.write('{"model_type": "llama"}')
print("ready", flush=True)
child = None
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "go":  # go <checkpoint dir> <log file> <first set>
        ckpt, log, first = args[0], args[1], int(args[2])
        child = os.fork()
        if child == 0:
            try:
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                k = first
                while True:
                    i = k % 3
                    os.write(fd, f"begin {i}\n".encode())
                    sync_checkpoint(sets[i], ckpt, src, extra_files={"trainer_state.json": json.dumps({"set": i}).encode()})
                    os.write(fd, f"end {i}\n".encode())
                    k += 1
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(3)
        print(child, flush=True)
    elif cmd == "wait":
        _, status = os.waitpid(child, 0)
        print(status, flush=True)
'''


def _expected_after(log: Path, known: int | None) -> set[int | None]:
    """The sets a checkpoint may hold after a kill: the last completed sync's, or the one in flight."""
    state, in_flight = known, None
    for line in _lines(log):
        word, i = line.split()
        if word == "begin":
            in_flight = int(i)
        else:
            state, in_flight = int(i), None
    return {state} | ({in_flight} if in_flight is not None else set())


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []  # killed before it opened the log


def _in_flight(log: Path) -> int | None:
    lines = _lines(log)
    return int(lines[-1].split()[1]) if lines and lines[-1].startswith("begin") else None


def test_sigkill_at_random_points_of_syncs_leaves_old_or_new(tmp_path):
    t_start = time.monotonic()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        refs = [load_file(str(tmp_path / f"ref-{i}.safetensors")) for i in range(3)]

        def run(ckpt: Path, first: int, delay: float, n: int) -> tuple[Path, int]:
            log = tmp_path / f"log-{n}"
            proc.stdin.write(f"go {ckpt} {log} {first}\n")
            pid = int(proc.stdout.readline())
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)  # the forked sync loop we started
            proc.stdin.write("wait\n")
            status = int(proc.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, proc.stderr.read()
            return log, status

        def check(ckpt: Path, log: Path, known: int | None) -> int | None:
            allowed = _expected_after(log, known)
            if not (ckpt / "current").exists():
                assert None in allowed, f"no checkpoint, expected one of {allowed}"
                return None
            loaded = load_current(ckpt)
            matches = [i for i, ref in enumerate(refs) if bitwise_equal(loaded, ref)]
            assert len(matches) == 1 and matches[0] in allowed, (matches, allowed)
            state = json.loads(load_checkpoint_state(ckpt)["trainer_state.json"])
            assert state == {"set": matches[0]}  # optimizer/trainer state flips with the weights
            return matches[0]

        # Calibrate: how long does one sync take here?
        ckpt = tmp_path / "ck"
        log, _ = run(ckpt, 0, 1.0, 0)
        known = check(ckpt, log, None)
        done = sum(line.startswith("end") for line in _lines(log))
        per_sync = 1.0 / max(done, 1)
        assert done >= 2, f"only {done} syncs in a second"
        rng = random.Random(1234)
        kills, outcomes = 0, {"old kept": 0, "new committed": 0, "between syncs": 0}
        for n in range(1, 25):
            fresh = n in (5, 17)  # a fresh directory: kills during the very first sync and its seeding
            target = tmp_path / f"fresh-{n}" if fresh else ckpt
            log, _ = run(target, rng.randrange(3), rng.uniform(0, 3.0 * per_sync), n)
            allowed = _expected_after(log, None if fresh else known)
            got = check(target, log, None if fresh else known)
            if not fresh:
                known = got
            kills += 1
            if len(allowed) == 1:  # killed between two syncs (or the in-flight one wrote the same set)
                outcomes["between syncs"] += 1
            else:
                outcomes["new committed" if got == _in_flight(log) else "old kept"] += 1
        print(f"{kills} kills, {per_sync * 1000:.0f} ms per sync: {outcomes}")
        assert kills >= 20
        assert time.monotonic() - t_start < 60
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


# ---- reading only what changed ------------------------------------------------------------------

def test_a_sync_reads_only_the_tensors_stepped_since_its_standby_was_written(tmp_path, monkeypatch):
    from plasticity_training.checkpoint import ChangeTracker

    src, ckpt = source_dir(tmp_path), tmp_path / "ck"
    g = torch.Generator().manual_seed(5)
    live = {f"w.{i}": torch.randn(256, 512, generator=g) for i in range(8)}  # 512 KiB each
    tensor_bytes = 256 * 512 * 4
    changes = ChangeTracker()
    sync_checkpoint(live, ckpt, src, changes=changes)  # gen-a written, gen-b seeded (seeded: not known)

    def step(name):
        live[name].add_(1.0)
        changes.stepped(n for n in live if n == name)  # a generator, as the trainer passes

    step("w.1")
    second = sync_checkpoint(live, ckpt, src, changes=changes)  # into the seeded gen-b: compared in full
    assert second.bytes_read >= 8 * tensor_bytes
    step("w.2")
    third = sync_checkpoint(live, ckpt, src, changes=changes)  # into gen-a: w.1 and w.2 changed since
    assert 2 * tensor_bytes <= third.bytes_read <= 2 * tensor_bytes + 3 * 4096
    assert third.weight_bytes_written >= 2 * tensor_bytes and bitwise_equal(load_current(ckpt), live)
    step("w.3")
    fourth = sync_checkpoint(live, ckpt, src, changes=changes)  # into gen-b: w.2 and w.3 since
    assert fourth.bytes_read <= 2 * tensor_bytes + 3 * 4096 and bitwise_equal(load_current(ckpt), live)

    # A sync that fails half-way leaves its generation unknown: the next one into it compares in full.
    step("w.4")
    monkeypatch.setattr(ck_io, "pwrite_all", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(ck.CheckpointWriteError):
        sync_checkpoint(live, ckpt, src, changes=changes)
    monkeypatch.undo()
    repaired = sync_checkpoint(live, ckpt, src, changes=changes)
    assert repaired.bytes_read >= 8 * tensor_bytes and bitwise_equal(load_current(ckpt), live)
