"""gkd.weights.transfer over gloo on 127.0.0.1: handshake, bucketed verified syncs, corruption, FSDP2
gather-to-root, versions announced in the store (an idle gap longer than the group timeout), the GPU path
(device word sum, bucket buffers, cast to the engine dtype) run with CPU tensors, and the device checksum
itself.

The multi-process tests spawn their processes once and run several scenarios in them (process start and
the ``transformers`` import dominate the cost); the others run the ranks as threads of the test process.
Every collective waits at most ``_GROUP_TIMEOUT``; the parent kills the processes after ``_TEST_TIMEOUT``.
"""

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from gkd.weights import native as _ext
from gkd.weights.flat import FlatBuffer, MetadataMismatch
from gkd.weights.transfer import (
    ChannelReform,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    init_weight_group,
)
from tests.ranks import run_ranks
from tests.tiny_llama import tiny_llama

_GROUP_TIMEOUT = timedelta(seconds=60)
_TEST_TIMEOUT = 150.0
_INPUT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_lm(seed: int, intermediate: int = 64, layers: int = 2):
    model = tiny_llama(
        seed, 128, 64, hidden=32, intermediate=intermediate, layers=layers, heads=4, kv_heads=2
    )
    return model.to(torch.bfloat16)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_INPUT).logits.float()


def _publish(group, key: str, t: torch.Tensor) -> None:
    group.store.set(key, t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())


def _fetch(group, key: str, like: torch.Tensor) -> torch.Tensor:
    raw = bytearray(group.store.get(key))  # raw bytes from the store, never unpickled
    return torch.frombuffer(raw, dtype=torch.uint8).view(like.dtype).view(like.shape)


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


class _Engine:
    """The rollout engines' contract: ``load_weights(iterable of (name, tensor))``, copying."""

    def __init__(self, model):
        self.model = model

    def load_weights(self, weights) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in weights:
                params[name].copy_(t)


def _lm_worker(rank: int, port: int, port2: int) -> None:
    torch.set_num_threads(1)
    group = init_weight_group("127.0.0.1", port, rank, 3, backend="gloo", timeout=_GROUP_TIMEOUT)
    assert not dist.is_initialized()  # the weight channel leaves the default group alone
    model = _tiny_lm(seed=rank)  # every rank starts from different weights
    if rank == 0:
        sender = WeightSender(group, model, bucket_bytes=16 << 10, alignment=64)
        assert len(sender.buckets) > 3
        sender.handshake()
        for version in (1, 2, 3):
            _perturb(model, seed=version)
            if version == 2:  # flip one byte of bucket 1 after its checksum: corruption in flight
                sender.bucket_hook = lambda i, buf: buf[5].bitwise_xor_(0xFF) if i == 1 else None
                with pytest.raises(WeightSyncError, match=r"version 2 was rejected.*bucket 1 crc32 checksum"):
                    sender.sync(version)
                sender.bucket_hook = None
            else:
                stats = sender.sync(version)
                assert stats["buckets"] == len(sender.buckets)
            _publish(group, f"logits/{version}", _logits(model))
        sender.close()
        group.store.wait(["timeout-checked"], _GROUP_TIMEOUT)  # stay alive while rank 1 times out
    else:
        receiver = WeightReceiver(group, model)
        receiver.handshake()
        assert receiver.receive() == 1
        assert receiver.apply(model) == 1
        v1 = _logits(model)
        assert torch.equal(v1, _fetch(group, "logits/1", v1))
        with pytest.raises(WeightSyncError, match="version 2 rejected, keeping version 1"):
            receiver.receive()
        with pytest.raises(WeightSyncError, match="no verified version is staged"):
            receiver.apply(model)
        assert torch.equal(_logits(model), v1)  # the old weights, untouched
        pending = receiver.receive_async()  # stage v3 while the "engine" keeps generating with v1
        assert torch.equal(_logits(model), v1)
        assert pending.result(timeout=_GROUP_TIMEOUT.total_seconds()) == 3
        assert receiver.apply(_Engine(model) if rank == 2 else model) == 3
        assert torch.equal(_logits(model), _fetch(group, "logits/3", v1))
        assert receiver.receive() is None  # sender closed
        if rank == 1:  # nothing more comes: the wait ends at its own 1 s timeout (not the group's 60 s)
            with pytest.raises(WeightSyncError, match="waiting for the next version: not there after 1s"):
                receiver.receive(timeout=timedelta(seconds=1))
            group.store.set("timeout-checked", "1")
        receiver.close()

    # A second channel where rank 2 runs a different model: everyone fails at the handshake.
    group2 = init_weight_group("127.0.0.1", port2, rank, 3, backend="gloo", timeout=_GROUP_TIMEOUT)
    if rank == 0:
        want = r"rank 2: .*unexpected \(9\): model.layers.1.*mismatch \(3\)"
        with pytest.raises(WeightSyncError, match=want):
            WeightSender(group2, model, bucket_bytes=16 << 10).handshake()
    elif rank == 1:
        with pytest.raises(WeightSyncError, match=r"handshake failed on ranks \[2\]"):
            WeightReceiver(group2, model).handshake()
    else:
        other = _tiny_lm(seed=0, intermediate=48, layers=1)
        with pytest.raises(
            MetadataMismatch,
            match=r"model.layers.0.mlp.up_proj.weight: expected "
            r"torch.bfloat16\[48, 32\], got torch.bfloat16\[64, 32\]",
        ):
            WeightReceiver(group2, other).handshake()


def test_sync_tiny_lm_one_sender_two_receivers():
    pytest.importorskip("transformers")
    run_ranks(_lm_worker, _free_port(), _free_port(), nprocs=3, timeout_s=_TEST_TIMEOUT)


def _fsdp_worker(rank: int, trainer_port: int, weight_port: int) -> None:
    # Ranks 0 and 1: the trainer (its own default group, FSDP2); rank 2: a rollout worker.
    torch.set_num_threads(1)
    mlp = lambda: torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.GELU(), torch.nn.Linear(33, 5))
    torch.manual_seed(0)
    model = mlp()
    if rank < 2:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{trainer_port}",
            rank=rank,
            world_size=2,
            timeout=_GROUP_TIMEOUT,
        )
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 6)).square().sum().backward()  # the weights change; shards differ per rank
        opt.step()
        group = None
        if rank == 0:
            group = init_weight_group("127.0.0.1", weight_port, 0, 2, timeout=_GROUP_TIMEOUT)
        sender = WeightSender(group, model, bucket_bytes=512, alignment=64)
        assert len(sender.buckets) >= 2
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        sender.handshake()
        sender.sync(1)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}  # all-gather, for the check only
        if rank == 0:
            _publish(group, "full", FlatBuffer.pack(full).buffer)
            sender.close()
        dist.destroy_process_group()
    else:
        group = init_weight_group("127.0.0.1", weight_port, 1, 2, timeout=_GROUP_TIMEOUT)
        receiver = WeightReceiver(group, model)
        receiver.handshake()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert receiver.receive() == 1
        receiver.apply(model)
        got = FlatBuffer.pack({n: p.detach() for n, p in model.named_parameters()}).buffer
        assert torch.equal(got, _fetch(group, "full", got))
        assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())
        assert receiver.receive() is None


def test_fsdp2_gather_to_root():
    run_ranks(_fsdp_worker, _free_port(), _free_port(), nprocs=3, timeout_s=_TEST_TIMEOUT)


def test_metadata_round_trip_and_rejection():
    from gkd.weights.flat import TensorMeta, plan_buckets
    from gkd.weights.wire import _metadata_bytes, _parse_metadata

    metas = [TensorMeta(f"w{i}", dt, (i + 1, 3)) for i, dt in enumerate([torch.bfloat16, torch.float32] * 3)]
    buckets = plan_buckets(metas, 64, alignment=16)
    assert _parse_metadata(_metadata_bytes(buckets, 16)) == buckets
    with pytest.raises(ValueError):
        _parse_metadata(b"\x80\x03not json")  # e.g. a pickle: never unpickled, just unreadable
    with pytest.raises(WeightSyncError, match="protocol 99"):
        _parse_metadata(_metadata_bytes(buckets, 16).replace(b'"v":2', b'"v":99'))
    exact = f'"nbytes":{buckets[0].nbytes},'.encode()  # bucket 0's size comes first in the JSON
    lying = _metadata_bytes(buckets, 16).replace(exact, b'"nbytes":4096,', 1)
    with pytest.raises(WeightSyncError, match="bucket 0 declares 4096 bytes"):
        _parse_metadata(lying)
    with pytest.raises(ValueError, match="dtype"):
        _parse_metadata(_metadata_bytes(buckets, 16).replace(b'"bfloat16"', b'"object"'))
    from gkd.weights.wire import _parse_metadata_doc

    assert _parse_metadata_doc(_metadata_bytes(buckets, 16, torch.bfloat16)) == (buckets, "bfloat16")
    with pytest.raises(WeightSyncError, match="dtype 'object'"):
        _parse_metadata_doc(
            _metadata_bytes(buckets, 16, torch.bfloat16).replace(b'"dtype":"bfloat16"', b'"dtype":"object"')
        )


# ------------------------------------------------------------------- ranks as threads of this process


def _pair(port: int, timeout: timedelta):
    """Rank 0 and rank 1 of a 2-rank gloo channel (built concurrently: the store's host waits for both)."""
    with ThreadPoolExecutor(2) as pool:
        ranks = [
            pool.submit(init_weight_group, "127.0.0.1", port, r, 2, backend="gloo", timeout=timeout)
            for r in (0, 1)
        ]
        return [f.result(timeout=60) for f in ranks]


def _in_thread(fn, join_s: float = _TEST_TIMEOUT):
    """Run ``fn`` on a thread; the returned callable joins it (at most ``join_s``) and re-raises its
    exception."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join():
        t.join(join_s)
        assert not t.is_alive(), f"the other rank did not finish within {join_s:.0f} s"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return join


def test_an_idle_gap_longer_than_the_group_timeout_times_nothing_out(caplog):
    """Versions are announced in the store: a receiver waiting for the next version posts no collective,
    so a gap of 3x the group timeout between two syncs is harmless (it used to wait inside the header
    broadcast and fail after the group timeout)."""
    group_timeout = timedelta(seconds=1.5)
    tx, rx = _pair(_free_port(), group_timeout)
    weights = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
    engine = {n: torch.zeros_like(t) for n, t in weights.items()}
    receiver = WeightReceiver(rx, engine, idle_timeout=timedelta(seconds=60), heartbeat_s=1.0)

    def send():
        sender = WeightSender(tx, weights, bucket_bytes=32, alignment=16)
        sender.handshake()
        sender.sync(1)
        time.sleep(3 * group_timeout.total_seconds())
        with torch.no_grad():
            weights["w"].add_(100)
        sender.sync(2)
        sender.close()

    done = _in_thread(send)
    receiver.handshake()
    with caplog.at_level(logging.INFO, logger="gkd.weights"):
        assert receiver.receive() == 1
        receiver.apply(engine)
        assert torch.equal(engine["w"], torch.arange(12.0).reshape(3, 4))
        assert receiver.receive() == 2  # waited out the sender's 4.5 s gap in the store, no error
        receiver.apply(engine)
        assert receiver.receive() is None
    done()
    assert torch.equal(engine["w"], weights["w"]) and torch.equal(engine["b"], weights["b"])
    beats = [r for r in caplog.records if "waiting for the next version (idle" in r.getMessage()]
    assert len(beats) >= 2  # the heartbeat line while idle


def test_a_receiver_inside_a_collective_leaves_an_abandoned_group_at_once():
    """A gloo peer learns that the sender gave a group up only when a connection closes, and an abandoned
    group's stay open (the sender lives on): the receiver watches the store while it waits in a collective
    and leaves at once, not at the group timeout, so it can join the channel's next generation in time."""
    # the group timeout (what the receiver's collective would wait without the store's flag) is far above
    # the 30 s the test gives the receiver to leave
    tx, rx = _pair(_free_port(), timedelta(seconds=120))
    receiver = WeightReceiver(rx, {"w": torch.zeros(4)})
    done = _in_thread(receiver.handshake, join_s=30)  # waits in the size broadcast, which is never posted
    time.sleep(0.5)
    WeightSender(tx, {"w": torch.zeros(4)}).abandon()
    with pytest.raises(ChannelReform, match="abandoned the weight channel during the handshake size"):
        done()
    rx.pg.abort()  # the receiver's side of the abandoned group: its pending broadcast ends now, not at exit


def test_gpu_path_on_cpu_tensors_casts_to_the_engine_dtype_and_the_word_sum_catches_a_flipped_byte():
    """The NCCL configuration's code path, forced on CPU: the sender checksums with the device word sum
    (``checksum="wsum"``), the receiver lands buckets in bucket buffers, verifies them there and copies
    them to host staging (``bounce=True``). fp32 master weights reach a bf16 engine as bf16 bytes (half
    the wire) equal bit for bit to ``master.to(bfloat16)``."""
    from tests.test_trainer_step import tiny_llama

    master = tiny_llama(0)  # fp32, as the trainer holds it
    engine = tiny_llama(1, dtype=torch.bfloat16)
    tx, rx = _pair(_free_port(), _GROUP_TIMEOUT)
    fp32_bytes = sum(p.nbytes for p in master.parameters())

    def send():
        sender = WeightSender(tx, master, dtype=torch.bfloat16, bucket_bytes=8 << 10, checksum="wsum")
        assert len(sender.buckets) >= 3 and sender.checksum == "wsum"
        sender.handshake()
        stats = sender.sync(1)
        assert stats["bytes"] < 0.51 * fp32_bytes + 64 * len(sender.buckets)  # bf16 on the wire
        sender.bucket_hook = lambda i, buf: buf[7].bitwise_xor_(0x10) if i == 2 else None
        with pytest.raises(WeightSyncError, match=r"version 2 was rejected.*bucket 2 wsum checksum"):
            sender.sync(2)
        sender.bucket_hook = None
        _perturb(master, seed=3)
        sender.sync(3)
        sender.close()

    done = _in_thread(send)
    receiver = WeightReceiver(rx, engine, bounce=True)
    receiver.handshake()
    assert receiver.sender_dtype == "bfloat16" and len(receiver._slots) == 2
    assert receiver.receive() == 1
    receiver.apply(engine)
    for name, p in engine.named_parameters():
        want = dict(master.named_parameters())[name].detach().to(torch.bfloat16)
        assert torch.equal(p.view(torch.int16), want.view(torch.int16)), name  # bit for bit
    v1 = {n: p.detach().clone() for n, p in engine.named_parameters()}
    with pytest.raises(
        WeightSyncError, match="version 2 rejected, keeping version 1: bucket 2 wsum checksum"
    ):
        receiver.receive()
    assert all(torch.equal(p, v1[n]) for n, p in engine.named_parameters())
    assert receiver.receive() == 3
    receiver.apply(engine)
    assert receiver.receive() is None
    done()
    for name, p in engine.named_parameters():
        assert torch.equal(p, dict(master.named_parameters())[name].detach().to(torch.bfloat16)), name


def _word_sum_reference(data: bytes) -> int:
    data += b"\0" * (-len(data) % 4)
    m, s1, s2 = (1 << 31) - 1, 0, 0
    for i in range(len(data) // 4):
        w = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        s1, s2 = (s1 + w) % m, (s2 + (i + 1) * w) % m
    return s1 | s2 << 31


def test_device_checksum_matches_its_definition_and_catches_flips_and_swaps(monkeypatch):
    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 256, (203,), dtype=torch.uint8, generator=g)
    buf[:16] = 255  # words at the top of the uint32 range
    for offset, n in [(0, 203), (3, 101), (4, 0), (1, 6), (8, 7)]:  # unaligned starts, partial last words
        got = _ext.device_checksum(buf, offset, n)
        assert got.dtype == torch.int64 and got.dim() == 0
        assert int(got) == _word_sum_reference(bytes(buf[offset : offset + n].tolist())), (offset, n)
    monkeypatch.setattr(_ext, "_SUM_CHUNK_WORDS", 7)  # several chunks: positions carry across them
    assert int(_ext.device_checksum(buf)) == _word_sum_reference(bytes(buf.tolist()))
    base = int(_ext.device_checksum(buf))
    for i in range(buf.numel()):  # every single flipped byte, every bit pattern class
        for flip in (0x01, 0x80, 0xFF):
            bad = buf.clone()
            bad[i] ^= flip
            assert int(_ext.device_checksum(bad)) != base, (i, flip)
    words = buf[:200].clone().view(torch.int32)
    swapped = words.clone()
    swapped[[3, 9]] = words[[9, 3]]
    assert int(_ext.device_checksum(swapped.view(torch.uint8))) != int(
        _ext.device_checksum(words.view(torch.uint8))
    )
    with pytest.raises(RuntimeError, match="does not fit"):
        _ext.device_checksum(buf, 200, 10)


def _bf16_flat(model) -> torch.Tensor:
    return FlatBuffer.pack(
        {n: p.detach().to(torch.bfloat16).cpu() for n, p in model.named_parameters()}
    ).buffer


def _nccl_worker(rank: int, port: int) -> None:
    from tests.test_trainer_step import tiny_llama

    torch.cuda.set_device(rank)
    timeout = timedelta(seconds=5)
    group = init_weight_group("127.0.0.1", port, rank, 2, backend="nccl", timeout=timeout)
    if rank == 0:
        master = tiny_llama(0).cuda()  # fp32 master weights on GPU 0
        sender = WeightSender(group, master, dtype=torch.bfloat16, bucket_bytes=8 << 10)
        assert sender.checksum == "wsum"
        sender.handshake()
        sender.sync(1)
        time.sleep(2 * timeout.total_seconds())  # idle longer than NCCL's timeout: nobody is in a collective
        _perturb(master, seed=2)
        sender.sync(2)
        _publish(group, "v2", _bf16_flat(master))
        sender.close()
        group.store.wait(["done"], _GROUP_TIMEOUT)  # the store lives in this process: outlive the reader
    else:
        engine = tiny_llama(1, dtype=torch.bfloat16).cuda()
        receiver = WeightReceiver(group, engine, idle_timeout=timedelta(seconds=60))  # host staging
        assert receiver.bounce and receiver.staging_device.type == "cpu"
        receiver.handshake()
        assert receiver.receive() == 1
        receiver.apply(engine)
        assert receiver.receive() == 2
        receiver.apply(engine)
        got = _bf16_flat(engine)
        assert torch.equal(got, _fetch(group, "v2", got))  # bit for bit the bf16 cast of the master
        assert receiver.receive() is None
        group.store.set("done", "1")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="an NCCL channel needs two GPUs (one per rank)")
def test_nccl_channel_idle_gap_cast_and_host_staging():
    run_ranks(_nccl_worker, _free_port(), nprocs=2, timeout_s=_TEST_TIMEOUT)


def test_a_sharded_sender_whose_broadcast_fails_still_gathers_every_bucket(monkeypatch):
    """FSDP2: the other trainer ranks take part in every bucket's gather once told to sync, so rank 0 must
    gather them all even after its broadcast failed (else they sit in a gather until the group timeout)."""
    import gkd.weights.transfer as weights

    gathered = []
    monkeypatch.setattr(weights, "_gather_to_root", lambda t, dtype=None: gathered.append(t) or t)

    class _Dead:  # the weight group: its broadcasts fail (a receiver died)
        rank, world_size, device, timeout, liveness = 0, 2, torch.device("cpu"), timedelta(seconds=1), None

        def broadcast(self, tensor):
            raise RuntimeError("Connection closed by peer")

        def wait(self, work, what, timeout=None):
            raise AssertionError("nothing to wait for")

    model = _tiny_lm(0)
    sender = WeightSender(None, model, bucket_bytes=4 << 10)
    sender.group, sender._sharded, sender._ready_version = _Dead(), True, 1
    sender._buffers = [torch.zeros(max(b.nbytes for b in sender.buckets) + 64, dtype=torch.uint8)] * 2
    assert len(sender.buckets) > 2
    with pytest.raises(WeightSyncError, match="Connection closed"):
        sender.sync(1)
    assert len(gathered) == sum(len(b.metas) for b in sender.buckets)
