"""cluster/weight_sync.py: bucketing as pure functions, then real pushes between Ray actors.

The Ray tests run one local Ray instance (CPU only) and three actors for the whole module (worker
start-up is most of the cost), rewired per test: a learner holding a LoRA-like dict (2 layers x 7
projections, rank 4, float32 and bfloat16 mixed) and two rollout actors holding a stand-in engine
with HFRolloutEngine's update contract (swap under a lock, a version). One test drives a real
HFRolloutEngine on a tiny random Llama. Equality is of bytes (``torch.equal`` on floats would
call two NaNs different). GPU transports are marked and skip without CUDA.
"""

from __future__ import annotations

import doctest
import inspect
import os
import threading
import time

import pytest
import torch

import cluster.weight_sync as ws
import cluster.weight_sync_dist as wsd
from cluster.weight_sync import (
    Bucket, ObjectStoreReceiver, ObjectStoreSender, TensorMeta, alloc_buckets, as_bytes,
    make_header, pack_bucket, plan_buckets, sync_round, unpack,
)
from cluster.weight_sync_dist import TorchDistributedReceiver, TorchDistributedSender
from scripts.bench_weight_sync import AdapterShape, lora_shapes

from tests.tiny import build_chat_llama

PROJ = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
        "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}  # (in, out)


def lora_like(layers: int = 2, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT-named A [r, in] / B [out, r] pairs; attention in float32, MLP in bfloat16, with
    arbitrary bit patterns (NaNs and infinities included: equality must be of bits)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for proj, (d_in, d_out) in PROJ.items():
            dtype = torch.float32 if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
                else torch.bfloat16
            part = "self_attn" if dtype == torch.float32 else "mlp"
            for ab, shape in (("A", (rank, d_in)), ("B", (d_out, rank))):
                name = f"base_model.model.model.layers.{i}.{part}.{proj}.lora_{ab}.weight"
                out[name] = _random_bits(shape, dtype, g)
    return out


def _random_bits(shape, dtype, g):
    int_dtype = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    info = torch.iinfo(int_dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=int_dtype).view(dtype)


def bits_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(as_bytes(a[k].reshape(-1).contiguous()),
                                                 as_bytes(b[k].reshape(-1).contiguous()))
        for k in a)


# ---------------------------------------------------------------------------- pure


def test_plan_buckets_groups_by_dtype_and_caps_size():
    metas = [TensorMeta("a", (4, 4), torch.float32), TensorMeta("b", (8,), torch.bfloat16),
             TensorMeta("c", (2, 2), torch.float32), TensorMeta("d", (100,), torch.float32),
             TensorMeta("e", (3,), torch.float32), TensorMeta("f", (0,), torch.bfloat16)]
    buckets = plan_buckets(metas, bucket_bytes=80)  # 20 float32 / 40 bfloat16 per bucket
    assert buckets == (
        Bucket(torch.float32, ("a", "c"), (0, 16), 20),
        Bucket(torch.float32, ("d",), (0,), 100),  # larger than the cap: alone
        Bucket(torch.float32, ("e",), (0,), 3),
        Bucket(torch.bfloat16, ("b", "f"), (0, 8), 8),
    )
    assert [b.nbytes for b in buckets] == [80, 400, 12, 16]
    one = plan_buckets(metas)  # the default cap: one bucket per dtype
    assert [(b.dtype, b.names) for b in one] == [
        (torch.float32, ("a", "c", "d", "e")), (torch.bfloat16, ("b", "f"))]


@pytest.mark.parametrize("cap", [1, 700, 1 << 30])
def test_pack_unpack_round_trip_is_bit_exact_and_unpacks_views(cap):
    tensors = lora_like()
    tensors["transposed"] = _random_bits((5, 3), torch.float32, torch.Generator()).t()
    header = make_header(7, tensors, bucket_bytes=cap)
    assert sum(len(b.names) for b in header.buckets) == len(tensors)
    assert header.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    buffers = [pack_bucket(tensors, b) for b in header.buckets]
    # over the wire as bytes: copy each buffer's bytes into a fresh buffer of the header's plan
    received = alloc_buckets(header)
    for src, dst in zip(buffers, received):
        as_bytes(dst).copy_(as_bytes(src))
    out = unpack(header, received)
    assert bits_equal(tensors, out)
    for name, view in out.items():  # views of the received buffers, not copies
        bucket = next(i for i, b in enumerate(header.buckets) if name in b.names)
        assert view.untyped_storage().data_ptr() == received[bucket].untyped_storage().data_ptr()


def test_unpack_and_pack_reject_mismatches():
    tensors = lora_like(layers=1)
    header = make_header(1, tensors)
    with pytest.raises(ValueError, match="buffers for"):
        unpack(header, [])
    bad = [torch.empty(b.numel + 1, dtype=b.dtype) for b in header.buckets]
    with pytest.raises(ValueError, match="does not fit"):
        unpack(header, bad)
    wrong = {k: v.float() for k, v in tensors.items()}
    with pytest.raises(TypeError, match="as the header says"):
        pack_bucket(wrong, header.buckets[-1])


def test_module_doctests():
    failures, _ = doctest.testmod(ws, verbose=False)
    assert failures == 0


def test_ends_by_name():
    from cluster.transports import make_receiver, make_sender
    from cluster.weight_sync_dist import TorchDistributedReceiver

    assert isinstance(make_sender("object_store", 3), ObjectStoreSender)
    assert isinstance(make_receiver("gloo", ("127.0.0.1", 1), 1, 3), TorchDistributedReceiver)
    with pytest.raises(ValueError, match="'carrier pigeon' is not one of"):
        make_sender("carrier pigeon", 2)


def test_interface_for_ip_and_pinning(monkeypatch):
    assert wsd.interface_for_ip("127.0.0.1") == "lo"
    assert wsd.interface_for_ip("203.0.113.77") is None
    assert wsd.interface_for_ip(wsd.node_ip()) is not None  # the address peers on other nodes dial
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "mine")
    assert wsd.pin_socket_interface("gloo", "127.0.0.1") == "mine"  # an explicit choice wins
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    assert wsd.pin_socket_interface("gloo", "127.0.0.1") == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"


def test_ipc_handle_layout_is_what_the_receiver_patches():
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from cluster.weight_sync_ipc import DEVICE_ARG

    params = list(inspect.signature(rebuild_cuda_tensor).parameters)
    assert params[DEVICE_ARG] == "storage_device"


# ---------------------------------------------------------------------------- Ray actors


class StandInEngine:
    """HFRolloutEngine's update contract without a model: ``update_adapter`` copies every tensor
    in under the lock and sets the version; ``generate`` reads every tensor twice under the
    lock, a pause apart, and reports the version it started with and the values it saw."""

    def __init__(self, metas):
        self._slots = {m.name: torch.zeros(m.shape, dtype=m.dtype) for m in metas}
        self._lock = threading.Lock()
        self.policy_version = 0

    def update_adapter(self, version, tensors):
        with self._lock:
            if list(tensors) != list(self._slots):
                raise KeyError("tensor names differ from the adapter's")
            for k, v in tensors.items():
                self._slots[k].copy_(v)
            self.policy_version = version

    def adapter_state(self):
        with self._lock:
            return {k: v.clone() for k, v in self._slots.items()}

    def generate(self, pause_s=2e-3):
        with self._lock:
            version, seen = self.policy_version, set()
            for _ in range(2):  # two passes over the adapter, a "forward pass" apart
                for t in self._slots.values():
                    seen.update(t.float().unique().tolist())
                time.sleep(pause_s)
            return version, seen


class Learner:
    """The sending end: a dict of tensors that changes every step, pushed with the step.
    ``setup`` rewires it (the actors live for the whole module: worker start-up is the cost)."""

    def setup(self, tensors, make_sender):
        torch.set_num_threads(1)
        self.tensors = tensors
        self.sender = make_sender()
        return getattr(self.sender, "address", None)

    def step(self, version, fill=False):
        g = torch.Generator().manual_seed(version)
        for t in self.tensors.values():
            if fill:
                t.fill_(version)
            else:
                t.copy_(_random_bits(t.shape, t.dtype, g))
        return self.sender.push(version, self.tensors)

    def state(self):
        return self.tensors


class RolloutHost:
    """A rollout actor: an engine plus the receiving end; ``sync`` = receive, then swap in."""

    def setup(self, make_engine, make_receiver):
        torch.set_num_threads(1)
        self.engine = make_engine()
        self.receiver = make_receiver()

    def sync(self, ticket):
        version, tensors = self.receiver.receive(ticket)
        self.engine.update_adapter(version, tensors)
        return version

    def state(self):
        return self.engine.policy_version, self.engine.adapter_state()

    def generate_until(self, version, timeout_s=60.0):
        seen, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen.append(self.engine.generate())
            if seen[-1][0] >= version:
                break
        return seen

    def generate(self, prompts, sampling):
        return self.engine.generate(prompts, 1, sampling)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def actors(ray_cluster):
    """One learner and two rollout actors (two threads each: generate beside sync)."""
    ray = ray_cluster
    learner = ray.remote(Learner).options(num_cpus=0).remote()
    hosts = [ray.remote(RolloutHost).options(num_cpus=0, max_concurrency=2).remote()
             for _ in range(2)]
    yield learner, hosts
    for actor in (learner, *hosts):
        ray.kill(actor)


def _wire(ray, actors, tensors, kind, hosts=2):
    """The learner and ``hosts`` rollout actors, set up for ``kind`` around stand-in engines."""
    learner, pool = actors
    pool, world, metas = pool[:hosts], hosts + 1, ws.describe(tensors)
    make_sender = ((lambda: TorchDistributedSender(world, "gloo")) if kind == "gloo"
                   else ObjectStoreSender)
    address = ray.get(learner.setup.remote(tensors, make_sender))
    ray.get([h.setup.remote(
        lambda: StandInEngine(metas),
        (lambda r=rank: TorchDistributedReceiver(address, r, world, "gloo")) if kind == "gloo"
        else ObjectStoreReceiver) for rank, h in enumerate(pool, start=1)])
    return learner, pool


def _push(kind, learner, hosts, version, fill=False):
    return sync_round(kind, lambda: learner.step.remote(version, fill),
                      [lambda t, h=h: h.sync.remote(t) for h in hosts])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gloo", "object_store"])
def test_engines_match_the_learner_bit_for_bit_after_every_push(ray_cluster, actors, kind):
    ray = ray_cluster
    learner, hosts = _wire(ray, actors, lora_like(), kind)
    for version in (1, 2, 3):
        stats, applied = _push(kind, learner, hosts, version)
        assert stats.version == version and applied == [version] * len(hosts)
        assert stats.buckets == 2 and stats.bytes > 0  # one per dtype under the default cap
        sent = ray.get(learner.state.remote())
        for engine_version, state in ray.get([h.state.remote() for h in hosts]):
            assert engine_version == version
            assert bits_equal(sent, state)


@pytest.mark.slow
def test_an_engine_never_generates_with_a_half_applied_update(ray_cluster, actors):
    ray = ray_cluster
    learner, (host,) = _wire(ray, actors, lora_like(), "gloo", hosts=1)
    last = 8
    looping = host.generate_until.remote(last)
    for version in range(1, last + 1):
        _push("gloo", learner, [host], version, fill=True)
    seen = ray.get(looping)
    assert seen[-1][0] == last
    for version, values in seen:  # every tensor held the version generate started with
        assert values == {float(version)}
    assert len({v for v, _ in seen}) >= 3  # generations really overlapped the updates


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(build_chat_llama(tmp_path_factory.mktemp("tiny-llama"), hidden=32, intermediate=64, max_positions=128))


@pytest.mark.slow
def test_real_hf_engine_takes_the_push_and_reports_its_version(ray_cluster, actors, tiny_llama):
    from rl.records import Prompt, SamplingParams

    ray = ray_cluster
    learner, (host, _) = actors

    def make_engine():
        from actors.rollout_hf import HFRolloutEngine

        return HFRolloutEngine(tiny_llama, lora_rank=4, lora_alpha=8,
                               target_modules=list(PROJ), seed=0)

    ray.get(host.setup.remote(make_engine, ObjectStoreReceiver))
    _, slots = ray.get(host.state.remote())  # PEFT's names and shapes, from the engine itself
    tiny = AdapterShape(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8,
                        rank=4, dtype="float32")
    assert [(k, tuple(v.shape)) for k, v in slots.items()] == list(lora_shapes(tiny).items())
    ray.get(learner.setup.remote(slots, ObjectStoreSender))
    prompt = [Prompt([1, 2, 3], "")]
    for version in (1, 2):
        _push("object_store", learner, [host], version, fill=True)  # finite: real logits
        sent = ray.get(learner.state.remote())
        engine_version, state = ray.get(host.state.remote())
        assert engine_version == version and bits_equal(sent, state)
        (completion,) = ray.get(host.generate.remote(
            prompt, SamplingParams(max_new_tokens=2, temperature=0.0)))
        assert completion.policy_version == version


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ipc_to_an_engine_on_the_same_card(ray_cluster):
    from cluster.weight_sync_ipc import CudaIpcReceiver, CudaIpcSender

    ray = ray_cluster
    tensors = lora_like()  # the sender packs them into buffers on its GPU
    metas = ws.describe(tensors)

    def make_engine():
        engine = StandInEngine(metas)
        engine._slots = {k: v.cuda() for k, v in engine._slots.items()}
        return engine

    learner = ray.remote(Learner).options(num_gpus=0.5).remote()
    host = ray.remote(RolloutHost).options(num_gpus=0.5).remote()
    ray.get(learner.setup.remote(tensors, CudaIpcSender))
    ray.get(host.setup.remote(make_engine, CudaIpcReceiver))
    try:
        for version in (1, 2):
            _push("cuda_ipc", learner, [host], version)
            sent = ray.get(learner.state.remote())
            engine_version, state = ray.get(host.state.remote())
            assert engine_version == version
            assert bits_equal(sent, {k: v.cpu() for k, v in state.items()})
    finally:
        ray.kill(learner)
        ray.kill(host)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_nccl_broadcast_between_two_gpus(ray_cluster):
    ray = ray_cluster
    tensors = lora_like()
    metas = ws.describe(tensors)
    learner = ray.remote(Learner).options(num_gpus=1).remote()
    host = ray.remote(RolloutHost).options(num_gpus=1).remote()
    address = ray.get(learner.setup.remote(tensors, lambda: TorchDistributedSender(2, "nccl")))
    ray.get(host.setup.remote(lambda: StandInEngine(metas),
                              lambda: TorchDistributedReceiver(address, 1, 2, "nccl")))
    try:
        _push("nccl", learner, [host], 1)
        sent = ray.get(learner.state.remote())
        engine_version, state = ray.get(host.state.remote())
        assert engine_version == 1 and bits_equal(sent, state)
    finally:
        ray.kill(learner)
        ray.kill(host)


def test_adapter_digest_is_equal_exactly_for_bit_equal_adapters():
    from cluster.weight_sync import adapter_digest

    a = {"b.lora_B": torch.zeros(4, 2), "a.lora_A": torch.arange(8.0).reshape(2, 4)}
    same = {name: t.clone() for name, t in reversed(a.items())}  # order does not matter
    assert adapter_digest(a) == adapter_digest(same)
    nudged = {**a, "a.lora_A": a["a.lora_A"].clone()}
    nudged["a.lora_A"][1, 3] = torch.nextafter(nudged["a.lora_A"][1, 3], torch.tensor(100.0))
    assert adapter_digest(nudged) != adapter_digest(a)
    assert adapter_digest({**a, "b.lora_B": a["b.lora_B"].to(torch.bfloat16)}) != adapter_digest(a)
    assert adapter_digest({**a, "b.lora_B": a["b.lora_B"].reshape(2, 4)}) != adapter_digest(a)
