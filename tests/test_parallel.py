"""The C++ worker pool behind every multithreaded CPU kernel (csrc/parallel.h, parallel.cpp).

Kernels against the reference at 1, 2 and 8 threads; the pool's workers created once; a process
that cannot create threads (RLIMIT_NPROC); a forked child; two Python threads calling kernels at
once; an exception thrown inside a chunk; a parallel_for nested inside one. The process-level
cases run in subprocesses (a limit, a fork or a hang must not reach the test process).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from qlora_kernels import reference as R
from qlora_kernels._native import native
from qlora_kernels.backends import lora_cpu
from qlora_kernels.backends.attention_cpu import flash_attention_bwd_cpu, flash_attention_fwd_cpu
from qlora_kernels.nf4 import nf4_quantize
from qlora_kernels.nf4_weight import NF4Weight
from qlora_kernels.ops import nf4 as ops
from qlora_kernels.reference import attention as ref_attention

from helpers import num_threads

_C = native()
pytestmark = pytest.mark.skipif(_C is None, reason="native module not built")

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"
# 8 threads need 8 x 2^15 items of work (kMinItemsPerThread): 520 x 511 NF4 elements
NF4_SHAPE = (520, 511)


def _run(script: str, timeout: float = 120) -> str:
    """Runs `script` in a fresh interpreter that imports this checkout; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(PYTHON_DIR), os.environ.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _nf4_round_trip_matches_reference(w, blocksize=64):
    packed, absmax = ops.nf4_quantize_blocks(w, blocksize)
    ref_packed, ref_absmax = R.nf4_quantize_blocks(w, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    for dtype in (torch.float32, torch.bfloat16):
        got = ops.nf4_dequantize(packed, absmax, None, None, None, blocksize, 256, list(w.shape), dtype)
        assert torch.equal(got, R.nf4_dequantize(ref_packed, ref_absmax, blocksize, list(w.shape), dtype))


def _attention_inputs():
    # 8 query blocks and batch x kv heads = 8 items: enough work for 8 threads in both passes
    q, k, v = torch.randn(2, 8, 128, 32), torch.randn(2, 4, 128, 32), torch.randn(2, 4, 128, 32)
    return q, k, v, torch.randn(q.shape)


def _attention_matches_reference(q, k, v, dout):
    out, lse = flash_attention_fwd_cpu(q, k, v, causal=True)
    grads = flash_attention_bwd_cpu(dout, None, q, k, v, out, lse, causal=True)[:3]
    d = [t.double() for t in (q, k, v, dout)]
    want_out, want_lse = ref_attention.flash_attention(*d[:3], causal=True)
    want_grads = ref_attention.flash_attention_backward(d[3], *d[:3], causal=True)[:3]
    for name, got, want, atol in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                                     (want_out, want_lse, *want_grads), (1e-5, 1e-5, 1e-4, 1e-4, 1e-4)):
        assert (got.double() - want).abs().max().item() <= atol, name


@pytest.mark.parametrize("threads", (1, 2, 8))
def test_kernels_match_reference_at_thread_counts(threads):
    before = torch.get_num_threads()
    w = torch.randn(NF4_SHAPE)
    q, k, v, dout = _attention_inputs()
    M, K, N, rank, p, seed, scaling = 64, 4096, 64, 8, 0.1, 1234, 0.5  # M x K mask: 8 threads' work
    nf4 = NF4Weight(*nf4_quantize(torch.randn(N, K), 64, double_quant=True))
    x, A, B, dy = torch.randn(M, K), torch.randn(rank, K) / math.sqrt(K), torch.randn(N, rank), torch.randn(M, N)
    W = nf4.dequantize_reference(torch.float32)
    with num_threads(threads):
        _nf4_round_trip_matches_reference(w)
        _attention_matches_reference(q, k, v, dout)
        keep = lora_cpu.dropout_keep_mask_cpu(seed, p, M, K)
        y, xa = lora_cpu.lora_forward_cpu(x, None, nf4, None, A, B, scaling, keep, p)
        dx, dA, dB, _ = lora_cpu.lora_backward_cpu(dy, x, None, nf4, A, B, scaling, keep, p, xa)
        assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == before
    assert torch.equal(keep, R.lora.dropout_keep_mask(seed, p, (M, K)))
    leaves = [t.double().requires_grad_() for t in (x, A, B)]
    want_y = R.lora.lora_linear(leaves[0], W.double(), None, leaves[1], leaves[2], scaling, keep, p)
    want_y.backward(dy.double())
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), (want_y, *(t.grad for t in leaves))):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                                   msg=name)


def test_workers_are_created_once_and_exit_is_clean():
    """Repeated calls reuse the same worker threads, and the interpreter exits cleanly (code 0)
    with them asleep in the pool."""
    out = _run("""
        import os, torch
        from qlora_kernels.backends import lora_cpu
        from qlora_kernels.nf4 import nf4_quantize
        from qlora_kernels.nf4_weight import NF4Weight
        torch.set_num_threads(3)
        torch.randn(1 << 20).sum()  # torch's own threads first
        tasks = lambda: set(os.listdir("/proc/self/task"))
        before = tasks()
        nf4 = NF4Weight(*nf4_quantize(torch.randn(256, 1024), 64))
        first = tasks()
        def call():
            lora_cpu.nf4_dequantize_range_cpu(nf4, 0, nf4.numel, torch.float32)
        for _ in range(100):
            call()
        print(len(first - before), first == tasks())
    """)
    assert out.split() == ["2", "True"], out


def test_thread_creation_failure_runs_with_fewer_workers():
    """Under RLIMIT_NPROC 0 no thread can be created (checked): calls at 8 threads run on the
    workers that exist (none, then one) and give the reference's results; nothing of a call runs
    after it returned."""
    out = _run("""
        import os, resource, threading, torch
        from qlora_kernels import reference as R
        from qlora_kernels._native import native
        from qlora_kernels.backends.attention_cpu import flash_attention_fwd_cpu
        from qlora_kernels.ops import nf4 as ops
        torch.manual_seed(0)
        torch.set_num_threads(8)
        torch.randn(1 << 22).sum()  # torch's OpenMP workers exist before the limit (it aborts otherwise)
        w = torch.randn(520, 511)
        want = R.nf4_quantize_blocks(w, 64)
        want_w = R.nf4_dequantize(*want, 64, [520, 511], torch.float32)
        q, k, v = torch.randn(2, 8, 128, 32), torch.randn(2, 4, 128, 32), torch.randn(2, 4, 128, 32)
        want_out = R.attention.flash_attention(q.double(), k.double(), v.double(), causal=True)[0]

        def check(label):
            got = ops.nf4_quantize_blocks(w, 64)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), label
            assert torch.equal(ops.nf4_dequantize(*got, None, None, None, 64, 256, [520, 511], torch.float32),
                               want_w), label
            out = flash_attention_fwd_cpu(q, k, v, causal=True)[0]
            assert (out.double() - want_out).abs().max() <= 1e-5, label
            hits, late, error = native()._parallel_for_probe(64, 8)
            assert set(hits) == {1} and late == 0 and error is None, (label, late, error)

        def can_start_a_thread():
            try:
                t = threading.Thread(target=lambda: None)
                t.start()
                t.join()
                return True
            except RuntimeError:
                return False

        if os.geteuid() == 0:
            import torch._dynamo  # imported by the ops on first call: unreadable to the user below
            os.setuid(65534)  # root ignores RLIMIT_NPROC
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, hard))
        assert not can_start_a_thread()
        check("no worker")
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
        tasks = len(os.listdir("/proc/self/task"))
        native()._parallel_for_probe(64, 2)  # one worker (changing torch's thread count would make
                                             # its OpenMP runtime create threads)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, hard))
        assert not can_start_a_thread()
        check("one worker, seven missing")
        print(len(os.listdir("/proc/self/task")) - tasks)
    """)
    assert out.split() == ["1"], out


def test_forked_child_gets_its_own_workers():
    """A child forked after the parent's pool has workers starts workers of its own (the
    parent's do not exist in it) and computes the same results."""
    out = _run("""
        import os, torch
        from qlora_kernels._native import native
        _C = native()
        assert set(_C._parallel_for_probe(64, 4)[0]) == {1}
        pid = os.fork()
        if pid == 0:
            before = len(os.listdir("/proc/self/task"))
            hits, late, error = _C._parallel_for_probe(64, 4)
            ok = set(hits) == {1} and late == 0 and error is None
            print(before, len(os.listdir("/proc/self/task")), ok, flush=True)
            os._exit(0 if ok else 1)
        assert os.waitpid(pid, 0)[1] == 0
    """, timeout=60)
    assert out.split() == ["1", "4", "True"], out


def test_two_python_threads_calling_kernels_at_once():
    w = torch.randn(NF4_SHAPE)
    packed, absmax = R.nf4_quantize_blocks(w, 64)
    want_w = R.nf4_dequantize(packed, absmax, 64, list(w.shape), torch.float32)
    q, k, v, dout = _attention_inputs()
    want_out = flash_attention_fwd_cpu(q, k, v, causal=True)[0]
    start, errors = threading.Barrier(2), []

    def worker(dequantize):
        try:
            start.wait()
            for _ in range(20):
                if dequantize:
                    got = ops.nf4_dequantize(packed, absmax, None, None, None, 64, 256, list(w.shape), torch.float32)
                    assert torch.equal(got, want_w)
                else:
                    assert torch.equal(flash_attention_fwd_cpu(q, k, v, causal=True)[0], want_out)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    with num_threads(4):
        threads = [threading.Thread(target=worker, args=(d,)) for d in (True, False)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads) and not errors, errors


def _probe_within(seconds, *args, **kwargs):
    result = []
    t = threading.Thread(target=lambda: result.append(_C._parallel_for_probe(*args, **kwargs)), daemon=True)
    t.start()
    t.join(seconds)
    assert result, f"parallel_for did not return within {seconds} s"
    return result[0]


@pytest.mark.parametrize("nested", (False, True))
def test_exception_in_a_chunk_reaches_the_caller_after_every_chunk_stopped(nested):
    hits, late, error = _probe_within(30, 64, 4, throw_at=37, nested=nested)
    assert error == "parallel_for_probe: item 37"
    assert late == 0 and hits[37] == 0 and set(hits) <= {0, 1}


def test_nested_parallel_for_runs_inline():
    hits, late, error = _probe_within(30, 64, 4, nested=True)
    assert set(hits) == {1} and late == 0 and error is None
