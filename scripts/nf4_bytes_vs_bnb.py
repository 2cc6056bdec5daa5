"""NF4 quantize on a CUDA machine: our bytes against bitsandbytes' CUDA kernel and against our
own CPU kernel, for a 4096x4096 normal weight in fp32 and bf16, single and double quant.
Prints, per case, how many packed bytes differ from bitsandbytes (the first 8 positions, ours
and theirs), whether the stored absmax (the nested 8-bit codes under double quant) is equal,
and whether our CUDA bytes equal our CPU bytes and bitsandbytes' bytes.

    python scripts/nf4_bytes_vs_bnb.py
"""

import bitsandbytes.functional as F
import torch

import qlora_kernels as qk

torch.manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    w = torch.randn(4096, 4096, device="cuda", dtype=dt)
    for dq in (False, True):
        p, s = qk.nf4_quantize(w, 64, double_quant=dq)
        bp, bs = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        a = p.view(torch.uint8).flatten()
        b = bp.view(torch.uint8).flatten()
        d = (a != b).nonzero().flatten()
        print(dt, "dq", dq, "bytes differ", d.numel(), "of", a.numel(), d[:8].tolist(), a[d[:8]].tolist(),
              b[d[:8]].tolist())
        print(" absmax eq", torch.equal(s.absmax.cpu().view(-1), bs.absmax.cpu().view(-1)), s.absmax.dtype,
              bs.absmax.dtype)
        pc, sc = qk.nf4_quantize(w.cpu(), 64, double_quant=dq)
        print(" ours cpu==ours cuda", torch.equal(pc.view(torch.uint8).flatten(), a.cpu()), "cpu==bnb",
              torch.equal(pc.view(torch.uint8).flatten(), b.cpu()))
