"""The block prefetcher on the CPU device (same ordering logic as CUDA, no streams), the streaming
self-test's verdict cache and fallback, and the plan's count of the prefetcher's buffers.

CUDA streams and events cannot run here; on a GPU the self-test itself (and benchmarks/gpu_acceptance.py)
checks them. What runs here is every decision: which block is copied into which slot when, slot reuse,
weights changed between forwards, a forward that raised, and bit-equality with the resident model.
"""

import json

import pytest
import torch

from framepack_local.memory import plan as m
from framepack_local.memory import streaming_selftest as st
from framepack_local.weights import casting, prefetch, streaming
from framepack_local.weights import storage as weight_storage

F32 = torch.float32


@pytest.fixture(scope="module")
def small_config(tiny_model_dir):
    config = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return dict(config, num_layers=2, num_single_layers=3)  # 5 blocks: slots get reused within a pass


@pytest.fixture(scope="module")
def folder(small_config, tmp_path_factory):
    return st.write_random_checkpoint(tmp_path_factory.mktemp("five") / "transformer", small_config)


@pytest.fixture(scope="module")
def inputs(small_config):
    return st.selftest_inputs(small_config, torch.device("cpu"), F32, h=4, w=4)


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.fixture(scope="module")
def resident_out(folder, inputs):
    return forward(weight_storage.load_transformer(folder, "bf16", F32), inputs)


def test_ordering_slot_reuse_and_equality(folder, inputs, resident_out):
    model = weight_storage.load_transformer(folder, "bf16", F32)
    host = {n: p.data_ptr() for n, p in model.named_parameters()}
    trace = []
    summary = streaming.apply_streaming(model, "cpu", resident_blocks=1, trace=trace)
    fetcher = streaming.prefetcher_of(model)
    assert summary["streamed_blocks"] == 4 and len(fetcher.slots) == 2 and summary["copies"] == "synchronous"
    slot_ptrs = [s.data_ptr() for s in fetcher.slots]
    one_pass = [("copy", 0, 0)]  # started by the resident head block, so it overlaps it
    for k in range(4):
        s = k % 2
        one_pass += [("compute", k, s), ("done", k, s)] + ([("copy", k + 1, 1 - s)] if k < 3 else [])
    for _ in range(2):
        trace.clear()
        assert torch.equal(forward(model, inputs), resident_out)
        assert trace == one_pass
    # no copy ever lands in a slot between its block's compute and done
    busy = set()
    for event, _, s in one_pass:
        assert event != "copy" or s not in busy
        busy = busy | {s} if event == "compute" else busy - {s} if event == "done" else busy
    assert [s.data_ptr() for s in fetcher.slots] == slot_ptrs  # allocated once, reused
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == host  # host tensors back after forward
    streaming.remove_streaming(model)
    assert not streaming._is_streaming(model)
    assert all(getattr(b, "_diffusers_hook", None) is None or b._diffusers_hook.get_hook(prefetch.HOOK_NAME) is None
               for b in model.modules())
    assert torch.equal(forward(model, inputs), resident_out)


def test_weights_changed_between_forwards_are_copied_again(folder, inputs):
    # Two streamed blocks fit the two slots: without the per-pass invalidation the second forward
    # would compute from the stale copy.
    model = weight_storage.load_transformer(folder, "bf16", F32)
    reference = weight_storage.load_transformer(folder, "bf16", F32)
    streaming.apply_streaming(model, "cpu", resident_blocks=3)
    forward(model, inputs)
    for target in (model, reference):
        target.single_transformer_blocks[2].proj_out.weight.data.mul_(1.5)
    assert torch.equal(forward(model, inputs), forward(reference, inputs))


def test_a_forward_that_raised_leaves_no_block_on_the_slots(folder, inputs, resident_out):
    model = weight_storage.load_transformer(folder, "bf16", F32)
    host = {n: p.data_ptr() for n, p in model.named_parameters()}
    streaming.apply_streaming(model, "cpu", resident_blocks=0)
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")

    handle = model.single_transformer_blocks[1].attn.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError):
        forward(model, inputs)
    assert streaming.prefetcher_of(model).active is not None  # the block was swapped in when it raised
    assert torch.equal(forward(model, inputs), resident_out)
    handle.remove()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == host


def test_selftest_passes_on_cpu_for_every_storage_and_fails_with_a_bad_comparison(small_config, tmp_path):
    verdict = st.streaming_selftest("cpu", tmp_path, config=small_config, key="k")
    assert verdict.passed and set(verdict.storages) == set(casting.STORAGES)
    assert all(r["equal"] and r["max_abs_diff"] == 0 for r in verdict.storages.values())
    assert list(tmp_path.iterdir()) == []  # the random checkpoint and fp8 copy are removed

    bad = st.streaming_selftest("cpu", tmp_path, config=small_config, storages=("bf16",), key="k",
                                compare=lambda a, b: False)
    assert not bad.passed and "bf16" in bad.why
    crashed = st.streaming_selftest("cpu", tmp_path, config=small_config, storages=("int3",), key="k")
    assert not crashed.passed and crashed.error and "failed to run" in crashed.why


def test_verdict_is_cached_per_fingerprint(tmp_path, monkeypatch):
    runs = []

    def fake(device, work_dir, *, key, **kw):
        runs.append(key)
        return st.Verdict(passed=key != "gpu B", fingerprint=key, storages={"bf16": {"equal": key != "gpu B",
                                                                                   "max_abs_diff": 0.5}})

    monkeypatch.setattr(st, "streaming_selftest", fake)
    assert st.streaming_verdict("cpu", tmp_path, key="gpu A").passed
    assert st.streaming_verdict("cpu", tmp_path, key="gpu A").passed  # cached: no second run
    assert not st.streaming_verdict("cpu", tmp_path, key="gpu B").passed
    assert runs == ["gpu A", "gpu B"]
    saved = json.loads((tmp_path / st.CACHE_FILE).read_text())["verdicts"]
    assert set(saved) == {"gpu A", "gpu B"} and saved["gpu B"]["passed"] is False
    assert st.streaming_verdict("cpu", tmp_path, key="gpu C", run=False) is None
    (tmp_path / st.CACHE_FILE).write_text("{not json")
    assert st.streaming_verdict("cpu", tmp_path, key="gpu A").passed and runs[-1] == "gpu A"  # re-tested
    assert "torch " in st.fingerprint(torch.device("cpu")) and "diffusers " in st.fingerprint(torch.device("cpu"))


@pytest.fixture(scope="module")
def real_sizes():
    from framepack_local.memory.probe import transformer_size_from_config
    from framepack_local.weights.model_folder import FRAMEPACK_TRANSFORMER_CONFIG

    return m.ModelSizes(transformer_size_from_config(FRAMEPACK_TRANSFORMER_CONFIG))


def gpu_facts(vram_gb, ram_gb=32):
    return m.SystemFacts(cuda=True, gpu_name="test GPU", vram_total=int(vram_gb * m.GB),
                         vram_free=int((vram_gb - 0.3) * m.GB), ram_total=int(ram_gb * m.GB),
                         ram_available=int(ram_gb * 0.8 * m.GB), disk_free=500 * m.GB, bitsandbytes=True)


def test_failed_verdict_means_synchronous_copies_in_plan_notice_and_record(real_sizes):
    p = m.plan(gpu_facts(8), real_sizes, m.JobShape())
    assert p.streamed_blocks > 0 and st.needs_streaming(p)
    failed = st.Verdict(False, "gpu", {"bf16": {"equal": False, "max_abs_diff": 0.25}})
    slow, notice, record = st.streaming_decision(p, failed)
    assert slow.stream_copies == "synchronous" and "(synchronous copies)" in slow.table()
    assert any("self-test" in n for n in slow.notes) and "0.25" in notice and notice.endswith(".")
    assert record["copies"] == "synchronous" and record["selftest"]["passed"] is False
    assert slow.to_dict()["stream_copies"] == "synchronous"
    assert st.streaming_decision(p, None)[0].stream_copies == "synchronous"  # never run: not trusted
    fast, notice, record = st.streaming_decision(p, st.Verdict(True, "gpu", {"bf16": {"equal": True,
                                                                                     "max_abs_diff": 0.0}}))
    assert fast.stream_copies == "overlapped" and notice is None and record["copies"] == "overlapped"
    cpu = m.plan(m.SystemFacts(False, None, 0, 0, 32 * m.GB, 30 * m.GB, 500 * m.GB), real_sizes, m.JobShape())
    assert st.streaming_decision(cpu, failed) == (cpu, None, {"copies": "none"})


def test_engine_records_the_fallback(tiny_model_dir, photo, tmp_path, monkeypatch):
    # The CPU never streams; pretend it does so the engine's handling of a failed verdict runs.
    from framepack_local.engine.generate import Engine
    from framepack_local.events import Notice
    from framepack_local.params import JobParams

    monkeypatch.setattr(st, "needs_streaming", lambda plan: True)
    monkeypatch.setattr(st, "streaming_verdict", lambda device, cache_dir: st.Verdict(
        False, "gpu", {"disk": {"equal": False, "max_abs_diff": 1.0}}))
    events = []
    result = Engine(device="cpu").generate(JobParams(
        image=str(photo), prompt="a kite", seconds=0.2, window=1, steps=1, resolution=64, models=str(tiny_model_dir),
        outputs=str(tmp_path), seed=1), on_event=events.append)
    record = json.loads((result.job_dir / "job.json").read_text())
    assert record["streaming"]["copies"] == "synchronous" and record["memory_plan"]["stream_copies"] == "synchronous"
    assert any(isinstance(e, Notice) and "self-test" in e.message for e in events)


def test_plan_counts_the_prefetchers_buffers(real_sizes):
    assert m.stream_buffers(1000, 0) is None
    one = m.stream_buffers(1000, 1)
    assert one.slots == 1 and one.device_bytes == one.pinned_bytes == 1000 + m.SLOT_PADDING_BYTES
    p = m.plan(gpu_facts(8), real_sizes, m.JobShape())
    block = real_sizes.transformer.block_bytes(p.transformer_storage)
    assert p.stream_buffers.device_bytes == p.stream_buffers.pinned_bytes == 2 * (block + m.SLOT_PADDING_BYTES)
    sections = next(s for s in p.stages if s.stage == "sections")
    image = next(s for s in p.stages if s.stage == "image")
    assert sections.ram - image.ram == p.stream_buffers.pinned_bytes  # staging is the only extra RAM
    assert m.plan(gpu_facts(80, 128), real_sizes, m.JobShape()).stream_buffers is None
    # what the prefetcher really allocates per slot, on the real 13B blocks (meta: no memory)
    from framepack_local.weights.model_folder import FRAMEPACK_TRANSFORMER_CONFIG

    for storage in ("bf16", "fp8"):
        meta = casting.build_meta_model(FRAMEPACK_TRANSFORMER_CONFIG)
        casting.prepare_meta(meta, storage, torch.bfloat16)
        biggest = max(prefetch.block_slot_bytes(b) for b in streaming._blocks(meta))
        assert real_sizes.transformer.block_bytes(storage) < biggest <= m.stream_buffers(
            real_sizes.transformer.block_bytes(storage), 2).slot_bytes


def test_step_estimate_overlaps_or_adds_the_copies(real_sizes):
    p = m.plan(gpu_facts(8), real_sizes, m.JobShape())
    fast = m.estimate_step_seconds(p, real_sizes.transformer, m.JobShape(), tflops=100, h2d_gb_s=20)
    slow = m.estimate_step_seconds(m.with_copy_mode(p, "synchronous"), real_sizes.transformer, m.JobShape(), 100, 20)
    assert fast["step_s"] == max(fast["compute_s"], fast["copy_s"]) > 0
    assert slow["step_s"] == pytest.approx(slow["compute_s"] + slow["copy_s"], abs=0.02)
    # 13B weights x ~18.7k tokens x 2 + attention: on the order of 1 PFLOP per step at the 640 bucket
    assert 5 < fast["compute_s"] < 20


def test_doctor_reports_the_selftest(tmp_path, monkeypatch):
    import torch as real_torch

    from framepack_local import doctor

    line, verdict = doctor._streaming_selftest(real_torch, tmp_path, cuda=False, measure=True)
    assert line.startswith("skipped: it needs a CUDA GPU") and verdict is None
    # The GPU branch with a verdict injected (no CUDA here): what a failed self-test tells the user.
    failed = st.Verdict(False, "gpu", {"fp8": {"equal": False, "max_abs_diff": 0.125}}, 21.0, None,
                        "2026-01-01T00:00:00")
    monkeypatch.setattr(st, "streaming_verdict", lambda device, cache, run: failed if run else None)
    line, verdict = doctor._streaming_selftest(real_torch, tmp_path, cuda=True, measure=True)
    assert line.startswith("FAILED (fp8 off by 0.125") and "synchronously" in line and verdict is failed
    assert str(tmp_path / ".cache" / st.CACHE_FILE) in line
    line, verdict = doctor._streaming_selftest(real_torch, tmp_path, cuda=True, measure=False)  # --quick
    assert line.startswith("not run yet") and verdict is None


# ---------------------------------------------------------------------------------------------
# The CUDA event protocol, with a recording stand-in for the CUDA calls (no GPU here; on a GPU the
# self-test checks the real thing). A vector-clock check proves the three orderings the streams need.
# ---------------------------------------------------------------------------------------------


class FakeCuda(prefetch.CudaCalls):
    def __init__(self, log, drop_waits_of=None):
        self.log, self.drop = log, drop_waits_of  # a stream whose waits are lost (a broken protocol)
        self.compute = FakeStream("compute", self)
        self.current, self.events = self.compute, 0

    def new_stream(self):
        return FakeStream("copy", self)

    def current_stream(self):
        return self.compute

    def new_event(self):
        self.events += 1
        return FakeEvent(f"e{self.events}", self)

    def on_stream(self, stream):
        import contextlib

        @contextlib.contextmanager
        def switch():
            previous, self.current = self.current, stream
            try:
                yield
            finally:
                self.current = previous
        return switch()

    def copy(self, dst, src):
        dst.copy_(src)
        self.log.append(("h2d", self.current.name))

    def pinned(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def synchronize(self):
        self.log.append(("sync",))


class FakeStream:
    def __init__(self, name, cuda):
        self.name, self.cuda = name, cuda

    def wait_event(self, event):
        if self.cuda.drop != self.name:
            self.cuda.log.append(("wait", self.name, event.name))


class FakeEvent:
    def __init__(self, name, cuda):
        self.name, self.cuda = name, cuda

    def record(self, stream):
        self.cuda.log.append(("record", self.name, stream.name))

    def synchronize(self):
        self.cuda.log.append(("host_wait", self.name))


def protocol_violations(log):
    """Replay the log with vector clocks; list every read/write of a slot or staging buffer that is not
    ordered after what it must follow."""
    clock = {"compute": {}, "copy": {}, "host": {}}
    events, ops = {}, {"compute": 0, "copy": 0}
    last_h2d, last_compute, pending_k, bad = {}, {}, None, []

    def covers(who, op):
        return op is None or clock[who].get(op[0], 0) >= op[1] or who == op[0]

    def merge(who, other):
        for k, v in other.items():
            clock[who][k] = max(clock[who].get(k, 0), v)

    for entry in log:
        kind = entry[0]
        if kind == "copy":
            pending_k, slot = entry[1], entry[2]
        elif kind == "h2d":
            stream = entry[1]
            if not covers(stream, last_compute.get(slot)):
                bad.append(f"copy of block {pending_k} overwrites slot {slot} before its last compute finished")
            if not covers("host", last_h2d.get(slot)):
                bad.append(f"staging {slot} refilled before its previous copy left it")
            ops[stream] += 1
            last_h2d[slot] = (stream, ops[stream])
        elif kind == "compute":
            if not covers("compute", last_h2d.get(entry[2])):
                bad.append(f"block {entry[1]} computes before its copy into slot {entry[2]} finished")
            ops["compute"] += 1
            last_compute[entry[2]] = ("compute", ops["compute"])
        elif kind == "record":
            events[entry[1]] = dict(clock[entry[2]], **{entry[2]: ops[entry[2]]})
        elif kind == "wait":
            merge(entry[1], events.get(entry[2], {}))
        elif kind == "host_wait":
            merge("host", events.get(entry[1], {}))
    return bad


@pytest.mark.parametrize("overlap", [True, False])
def test_cuda_event_protocol_orders_every_copy(folder, inputs, resident_out, overlap):
    model = weight_storage.load_transformer(folder, "bf16", F32)
    log = []
    summary = streaming.apply_streaming(model, "cpu", resident_blocks=1, use_stream=overlap, trace=log,
                                        calls=FakeCuda(log))
    assert summary["copies"] == ("overlapped" if overlap else "synchronous") and summary["pinned_bytes"] > 0
    for _ in range(2):
        assert torch.equal(forward(model, inputs), resident_out)
    h2d = [e for e in log if e[0] == "h2d"]
    assert len(h2d) == 8 and {e[1] for e in h2d} == {"copy" if overlap else "compute"}
    assert protocol_violations(log) == []
    # the check can fail: without the compute stream's waits (diffusers PR #13502's bug) or the copy
    # stream's, it reports the race; with one stream (synchronous copies) there is none to report
    for stream, race in (("compute", "computes before its copy"), ("copy", "before its last compute")):
        model2 = weight_storage.load_transformer(folder, "bf16", F32)
        log2 = []
        streaming.apply_streaming(model2, "cpu", resident_blocks=1, use_stream=overlap, trace=log2,
                                  calls=FakeCuda(log2, drop_waits_of=stream))
        forward(model2, inputs)
        assert overlap == any(race in b for b in protocol_violations(log2)), stream
