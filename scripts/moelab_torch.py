#!/usr/bin/env python3
"""Rebuild a moelab model in PyTorch from its run folder and check it against moelab.

A finished `moelab train` run (train.save_final = true) leaves in its folder:
  model.safetensors   the weights, under nanochat's parameter names
  config.json         format "moelab-model/1", every model.* / moe.* config key, derived shapes
  check_batch.json    one validation batch and the mean loss moelab computed on it

    python3 scripts/moelab_torch.py RUN_DIR            # load, run the check batch, compare
    python3 scripts/moelab_torch.py RUN_DIR --dtype float32

As a library: `model = load(RUN_DIR)` gives a torch.nn.Module whose forward(tokens [B, T]) returns
logits after the softcap, and `model.loss(tokens, targets)` the mean cross-entropy over targets >= 0.

The model is moelab's GptMoE as docs/ARCHITECTURE.md and src/backend/backend.hpp define it: RMSNorm
without weights (eps from config.json), rotary on pairs (i, i + hd/2) then per-head RMSNorm of q
and k, causal attention with scale 1/sqrt(hd), grouped kv heads and per-layer sliding windows
(config.json's "windows"), ReLU^2 MLPs, MoE with softmax
top-k routing, renormalized gates and (capacity dispatch) GShard's keep order (all first choices,
then second choices, each by token), logit softcap. A config with a key this file does not know
is refused: a newer moelab option would change the model in ways this code would not reproduce.
Needs only torch (the safetensors file is read here, without the safetensors package).
"""
import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

FORMAT = "moelab-model/1"

# Every model.* / moe.* key this loader implements, with how to read its text. A key missing here
# makes load() refuse the model.
KNOWN_KEYS = {
    "model.d_model": int, "model.layers": int, "model.head_dim": int, "model.kv_heads": int, "model.window_pattern": str,
    "model.vocab": int, "model.mlp_hidden": int, "model.max_seq": int, "model.rope_base": float,
    "model.softcap": float, "model.init_scale": float,
    "moe.experts": int, "moe.top_k": int, "moe.expert_hidden": int, "moe.layers": str,
    "moe.shared_expert": lambda s: s == "true", "moe.shared_hidden": int, "moe.dispatch": str,
    "moe.capacity_factor": float, "moe.balance_coef": float,
}

_DTYPES = {"F32": (torch.float32, 4), "F64": (torch.float64, 8), "BF16": (torch.bfloat16, 2),
           "I32": (torch.int32, 4), "I64": (torch.int64, 8)}


def read_safetensors(path):
    """{name: tensor} of a safetensors file (8-byte header length, JSON header, raw data)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        dtype, size = _DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(e["shape"]).clone()
    return out


def read_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        cj = json.load(f)
    if cj.get("format") != FORMAT:
        raise ValueError(f"config.json: format {cj.get('format')!r} is not {FORMAT!r}")
    unknown = sorted(set(cj["config"]) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError("config.json has option(s) this loader does not implement: " + ", ".join(unknown) +
                         "; update scripts/moelab_torch.py to the moelab version that wrote the run")
    missing = sorted(set(KNOWN_KEYS) - set(cj["config"]))
    if missing:
        raise ValueError("config.json lacks key(s): " + ", ".join(missing))
    cfg = {k: KNOWN_KEYS[k](v) for k, v in cj["config"].items()}
    return cfg, cj


def rms_norm(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class GptMoE(torch.nn.Module):
    def __init__(self, cfg, meta, weights, dtype=torch.float64):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.eps = float(meta["norm_eps"])
        self.heads, self.kv_heads = int(meta["heads"]), int(meta["kv_heads"])
        self.moe_layers = set(int(i) for i in meta["moe_layers"])
        # Per layer: 0 = full causal attention, w > 0 = query t sees keys t - w .. t.
        self.windows = [int(w) for w in meta["windows"]]
        self.w = {k: v.to(dtype) for k, v in weights.items()}
        hd, half = cfg["model.head_dim"], cfg["model.head_dim"] // 2
        t = torch.arange(cfg["model.max_seq"], dtype=torch.float64)[:, None]
        inv = cfg["model.rope_base"] ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
        # moelab keeps its tables in f32.
        self.cos = torch.cos(t * inv).float().to(dtype)
        self.sin = torch.sin(t * inv).float().to(dtype)

    def rope_norm(self, x):  # x [B, T, H, hd]
        T, half = x.shape[1], x.shape[-1] // 2
        c, s = self.cos[:T, None, :], self.sin[:T, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        y = torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)
        return rms_norm(y, self.eps)

    def moe(self, p, xn):  # xn [N, D]
        E, k = self.cfg["moe.experts"], self.cfg["moe.top_k"]
        N = xn.shape[0]
        probs = torch.softmax(xn @ self.w[p + "router.weight"].T, dim=-1)
        # Descending probability, ties to the lower expert index (a stable sort keeps index order).
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
        chosen = torch.gather(probs, 1, order)
        gates = chosen / chosen.sum(-1, keepdim=True)
        keep = torch.ones(N, k, dtype=torch.bool)
        if self.cfg["moe.dispatch"] == "capacity":
            cap = math.ceil(self.cfg["moe.capacity_factor"] * N * k / E)
            # Assignment (t, j) in rank-major order j * N + t; its place in its expert's queue.
            flat = order.T.reshape(-1)  # [k * N]
            onehot = F.one_hot(flat, E)
            place = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
            keep = (place < cap).reshape(k, N).T
        out = torch.zeros_like(xn)
        w_fc, w_proj = self.w[p + "experts.w_fc"], self.w[p + "experts.w_proj"]
        for e in range(E):
            tok, j = torch.nonzero((order == e) & keep, as_tuple=True)
            if tok.numel() == 0:
                continue
            h = F.relu(xn[tok] @ w_fc[e].T).square() @ w_proj[e].T
            out.index_add_(0, tok, gates[tok, j, None] * h)
        if p + "shared.c_fc.weight" in self.w:
            out = out + F.relu(xn @ self.w[p + "shared.c_fc.weight"].T).square() @ self.w[p + "shared.c_proj.weight"].T
        return out

    def forward(self, tokens):  # tokens [B, T] -> softcapped logits [B, T, V]
        B, T = tokens.shape
        D, hd = self.cfg["model.d_model"], self.cfg["model.head_dim"]
        x = rms_norm(self.w["transformer.wte.weight"][tokens.reshape(-1)], self.eps)  # [N, D]
        for i in range(self.cfg["model.layers"]):
            p = f"transformer.h.{i}."
            xn = rms_norm(x, self.eps)
            q = (xn @ self.w[p + "attn.c_q.weight"].T).view(B, T, self.heads, hd)
            k = (xn @ self.w[p + "attn.c_k.weight"].T).view(B, T, self.kv_heads, hd)
            v = (xn @ self.w[p + "attn.c_v.weight"].T).view(B, T, self.kv_heads, hd)
            q, k = self.rope_norm(q), self.rope_norm(k)
            group = self.heads // self.kv_heads  # query head h reads kv head h // group
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
            pos = torch.arange(T)
            visible = pos[None, :] <= pos[:, None]  # [query, key]: causal
            if 0 < self.windows[i] < T:
                visible &= pos[None, :] >= pos[:, None] - self.windows[i]
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=visible, scale=1.0 / math.sqrt(hd))
            x = x + att.transpose(1, 2).reshape(B * T, self.heads * hd) @ self.w[p + "attn.c_proj.weight"].T
            xn = rms_norm(x, self.eps)
            if i in self.moe_layers:
                x = x + self.moe(p + "mlp.", xn)
            else:
                x = x + F.relu(xn @ self.w[p + "mlp.c_fc.weight"].T).square() @ self.w[p + "mlp.c_proj.weight"].T
        logits = rms_norm(x, self.eps) @ self.w["lm_head.weight"].T
        cap = self.cfg["model.softcap"]
        return (cap * torch.tanh(logits / cap)).view(B, T, -1)

    def loss(self, tokens, targets):
        z = self.forward(tokens)
        return F.cross_entropy(z.reshape(-1, z.shape[-1]).double(), targets.reshape(-1).long(), ignore_index=-1)


def load(run_dir, dtype=torch.float64):
    cfg, meta = read_config(run_dir)
    weights = read_safetensors(os.path.join(run_dir, "model.safetensors"))
    return GptMoE(cfg, meta, weights, dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="largest accepted relative loss difference (default 1e-5 for an f32 run, 2e-2 for bf16)")
    args = ap.parse_args()
    model = load(args.run_dir, getattr(torch, args.dtype))
    with open(os.path.join(args.run_dir, "check_batch.json")) as f:
        check = json.load(f)
    B, T = check["rows"], check["seq_len"]
    tokens = torch.tensor(check["tokens"], dtype=torch.long).view(B, T)
    targets = torch.tensor(check["targets"], dtype=torch.long).view(B, T)
    with torch.no_grad():
        loss = model.loss(tokens, targets).item()
    ref = check["loss"]
    rel = abs(loss - ref) / max(abs(ref), 1e-30)
    compute = json.load(open(os.path.join(args.run_dir, "config.json")))["compute_dtype"]
    tol = args.tolerance if args.tolerance is not None else (1e-5 if compute in ("f32", "f64") else 2e-2)
    ok = math.isfinite(loss) and rel <= tol
    print(f"moelab loss {ref:.8f} | torch ({args.dtype}) loss {loss:.8f} | relative difference {rel:.2e} "
          f"(tolerance {tol:.0e}, moelab computed in {compute}) | {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
