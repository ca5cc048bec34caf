#!/usr/bin/python3
"""Rebuild a moelab model in PyTorch from its run folder and check it against moelab.

A finished `moelab train` run (train.save_final = true) leaves in its folder:
  model.safetensors   the weights, under nanochat's parameter names
  config.json         format "moelab-model/1", every model.* / moe.* config key, derived shapes
  check_batch.json    one validation batch and the mean loss moelab computed on it

    python3 scripts/moelab_torch.py RUN_DIR            # load, run the check batch, compare
    python3 scripts/moelab_torch.py RUN_DIR --dtype float32
    python3 scripts/moelab_torch.py RUN_DIR --prompt-ids 1,2,3 --max-tokens 20   # greedy continuation
    python3 scripts/moelab_torch.py --list-keys        # the config keys this loader implements

Runs under Debian's /usr/bin/python3 with its python3-torch (1.13) and under newer torch.

As a library: `model = load(RUN_DIR)` gives a torch.nn.Module whose forward(tokens [B, T]) returns
logits after the softcap, `model.loss(tokens, targets)` the mean cross-entropy over targets >= 0,
and `model.greedy(prompt_ids, n)` the greedy continuation (each step re-runs the whole prefix).

The model is moelab's GptMoE as docs/ARCHITECTURE.md and src/backend/backend.hpp define it:
embedding, RMSNorm without weights (eps from config.json) giving x0; per block, with
model.scalar_lambdas, x = resid_lambdas[i] x + x0_lambdas[i] x0 (block 0's x is x0); rotary on
pairs (i, i + hd/2) then per-head RMSNorm of q and k; with model.value_embeddings, on alternating
layers (the last included) v += 2 sigmoid(xn[:, :C] W_gate^T) * value_embeds[token] per kv head;
causal attention with scale 1/sqrt(hd), grouped kv heads and per-layer sliding windows
(config.json's "windows": query t sees keys t - w .. t); ReLU^2 MLPs; MoE with softmax top-k
(or sigmoid) routing, renormalized (or raw, scaled) gates, the aux-loss-free bias on the
choice, group-limited routing, optional shared experts and (capacity dispatch) moelab's keep order
(moe.drop_order: rank = all first choices then second choices, each by token; token = flat
(t, j) order); final RMSNorm, untied head, logit softcap. A config with a key this file does not
know is refused: a newer moelab option would change the model in ways this code would not
reproduce. Needs only torch (the safetensors file is read here, without the safetensors package).
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


def _bool(s):
    if s not in ("true", "false"):
        raise ValueError(f"not a boolean: {s!r}")
    return s == "true"


# Every model.* / moe.* key moelab writes to config.json, with how to read its text. A key
# missing here makes load() refuse the model. Keys that only shape training (the balance loss,
# the router's init) are read so that they are known, and change nothing in the forward.
KNOWN_KEYS = {
    "model.d_model": int, "model.layers": int, "model.head_dim": int, "model.kv_heads": int,
    "model.window_pattern": str, "model.vocab": int, "model.mlp_hidden": int, "model.max_seq": int,
    "model.rope_base": float, "model.softcap": float, "model.init_scale": float,
    "model.value_embeddings": _bool, "model.ve_gate_channels": int, "model.scalar_lambdas": _bool,
    "moe.experts": int, "moe.top_k": int, "moe.expert_hidden": int, "moe.layers": str,
    "moe.shared_expert": _bool, "moe.shared_hidden": int, "moe.dispatch": str,
    "moe.capacity_factor": float, "moe.balance_coef": float, "moe.balance_rule": str,
    "moe.drop_order": str, "moe.router_init": str,
    "moe.score": str, "moe.norm_topk": _bool, "moe.route_scale": float, "moe.balance": str,
    "moe.bias_update_rate": float, "moe.balance_scope": str, "moe.z_loss_coef": float,
    "moe.shared_experts": int, "moe.groups": int, "moe.topk_groups": int,
}

_DTYPES = {"F32": (torch.float32, 4), "F64": (torch.float64, 8), "BF16": (torch.bfloat16, 2),
           "I32": (torch.int32, 4), "I64": (torch.int64, 8)}


def _sdpa_takes_scale():
    """torch >= 2.1 has SDPA with an explicit scale; Debian 12's torch 1.13 has no SDPA at all."""
    try:
        major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    except ValueError:
        return False
    return hasattr(F, "scaled_dot_product_attention") and (major, minor) >= (2, 1)


_HAS_SDPA = _sdpa_takes_scale()


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
        raise ValueError("config.json lacks key(s): " + ", ".join(missing) +
                         " (written by an older moelab? retrain, or add the key with its default)")
    cfg = {k: KNOWN_KEYS[k](v) for k, v in cj["config"].items()}
    for key, allowed in (("moe.dispatch", ("dropless", "capacity")), ("moe.drop_order", ("rank", "token")),
                         ("moe.score", ("softmax", "sigmoid"))):
        if cfg[key] not in allowed:
            raise ValueError(f"config.json: {key} = {cfg[key]!r} is not one of {', '.join(allowed)}")
    return cfg, cj


def rms_norm(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def expert_capacity(cfg, tokens):
    """Per-expert capacity for a batch of `tokens` tokens, as Config::expert_capacity: 0 = dropless."""
    E, k, cf = cfg["moe.experts"], cfg["moe.top_k"], cfg["moe.capacity_factor"]
    if cfg["moe.dispatch"] != "capacity" or E <= 0 or not cf > 0:
        return 0
    return max(1, math.ceil(tokens * k / E * cf))  # the seed's order of operations


def attention(q, k, v, window):
    """Causal attention of q [B, Hq, T, hd] over k, v [B, Hq, S, hd] (S >= T: the last T keys are
    the queries' own positions), scale 1/sqrt(hd); window > 0 limits query t to keys t - w .. t."""
    T, S, hd = q.shape[2], k.shape[2], q.shape[3]
    qpos = torch.arange(S - T, S)[:, None]
    kpos = torch.arange(S)[None, :]
    visible = kpos <= qpos
    if window > 0:
        visible = visible & (kpos >= qpos - window)
    if _HAS_SDPA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=1.0 / math.sqrt(hd))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


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
        L = cfg["model.layers"]
        # Value embeddings sit on alternating layers, the last one always among them.
        self.ve_layers = {i for i in range(L) if cfg["model.value_embeddings"] and i % 2 == (L - 1) % 2}
        for i in self.ve_layers:
            for name in (f"value_embeds.{i}.weight", f"transformer.h.{i}.attn.ve_gate.weight"):
                if name not in self.w:
                    raise ValueError(f"model.safetensors lacks {name}, which model.value_embeddings = true needs")
        if cfg["model.scalar_lambdas"] and not ("resid_lambdas" in self.w and "x0_lambdas" in self.w):
            raise ValueError("model.safetensors lacks resid_lambdas / x0_lambdas, which model.scalar_lambdas = true needs")
        hd, half = cfg["model.head_dim"], cfg["model.head_dim"] // 2
        t = torch.arange(cfg["model.max_seq"], dtype=torch.float64)[:, None]
        inv = cfg["model.rope_base"] ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
        # moelab keeps its tables in f32.
        self.cos = torch.cos(t * inv).float().to(dtype)
        self.sin = torch.sin(t * inv).float().to(dtype)

    def rope_norm(self, x):  # x [B, T, H, hd] at positions 0 .. T-1
        T, half = x.shape[1], x.shape[-1] // 2
        c, s = self.cos[:T, None, :], self.sin[:T, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        y = torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)
        return rms_norm(y, self.eps)

    def moe(self, p, xn, dropless=False):  # xn [N, D]: every token of the batch routes together
        E, k = self.cfg["moe.experts"], self.cfg["moe.top_k"]
        N = xn.shape[0]
        logits = xn @ self.w[p + "router.weight"].T
        probs = torch.sigmoid(logits) if self.cfg["moe.score"] == "sigmoid" else torch.softmax(logits, dim=-1)
        # The choice reads the scores plus the aux-loss-free bias (a buffer in model.safetensors);
        # the gates read the scores alone.
        choice = probs + self.w[p + "router.score_bias"] if p + "router.score_bias" in self.w else probs
        G = self.cfg["moe.groups"]
        if G > 1:  # group-limited: keep the topk_groups groups whose two best choice scores sum highest
            per = E // G
            group_score = choice.reshape(N, G, per).topk(min(2, per), dim=-1).values.sum(-1)
            kept = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :self.cfg["moe.topk_groups"]]
            mask = torch.zeros(N, G, dtype=torch.bool).scatter(1, kept, True).repeat_interleave(per, dim=1)
            choice = choice.masked_fill(~mask, float("-inf"))
        # Descending choice score, ties to the lower expert index (a stable sort keeps index order).
        order = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :k]  # [N, k]
        chosen = torch.gather(probs, 1, order)
        gates = chosen / chosen.sum(-1, keepdim=True) if self.cfg["moe.norm_topk"] else chosen
        gates = gates * self.cfg["moe.route_scale"]
        keep = torch.ones(N, k, dtype=torch.bool)
        cap = 0 if dropless else expert_capacity(self.cfg, N)
        if cap > 0:
            # Each assignment's place in its expert's queue: rank order lists (j, t) (every first
            # choice, then every second), token order lists (t, j).
            rank_major = self.cfg["moe.drop_order"] == "rank"
            flat = (order.T if rank_major else order).reshape(-1)
            onehot = F.one_hot(flat, E)
            place = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
            keep = (place < cap).reshape(k, N).T if rank_major else (place < cap).reshape(N, k)
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

    def forward(self, tokens, dropless=False):
        """tokens [B, T] -> softcapped logits [B, T, V]. dropless routes every token to its top-k
        experts whatever moe.dispatch says (what `moelab sample` does: per-token routing)."""
        B, T = tokens.shape
        hd = self.cfg["model.head_dim"]
        ids = tokens.reshape(-1)
        x0 = rms_norm(self.w["transformer.wte.weight"][ids], self.eps)  # [N, D]
        x = x0
        for i in range(self.cfg["model.layers"]):
            p = f"transformer.h.{i}."
            if self.cfg["model.scalar_lambdas"]:
                x = self.w["resid_lambdas"][i] * x + self.w["x0_lambdas"][i] * x0
            xn = rms_norm(x, self.eps)
            q = (xn @ self.w[p + "attn.c_q.weight"].T).view(B, T, self.heads, hd)
            k = (xn @ self.w[p + "attn.c_k.weight"].T).view(B, T, self.kv_heads, hd)
            v = (xn @ self.w[p + "attn.c_v.weight"].T).view(B * T, self.kv_heads, hd)
            if i in self.ve_layers:
                C = self.cfg["model.ve_gate_channels"]
                gate = 2 * torch.sigmoid(xn[:, :C] @ self.w[p + "attn.ve_gate.weight"].T)  # [N, Hkv]
                ve = self.w[f"value_embeds.{i}.weight"][ids].view(B * T, self.kv_heads, hd)
                v = v + gate[:, :, None] * ve
            v = v.view(B, T, self.kv_heads, hd)
            q, k = self.rope_norm(q), self.rope_norm(k)
            group = self.heads // self.kv_heads  # query head h reads kv head h // group
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
            att = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.windows[i])
            x = x + att.transpose(1, 2).reshape(B * T, self.heads * hd) @ self.w[p + "attn.c_proj.weight"].T
            xn = rms_norm(x, self.eps)
            if i in self.moe_layers:
                x = x + self.moe(p + "mlp.", xn, dropless)
            else:
                x = x + F.relu(xn @ self.w[p + "mlp.c_fc.weight"].T).square() @ self.w[p + "mlp.c_proj.weight"].T
        logits = rms_norm(x, self.eps) @ self.w["lm_head.weight"].T
        cap = self.cfg["model.softcap"]
        return (cap * torch.tanh(logits / cap)).view(B, T, -1)

    def loss(self, tokens, targets):
        z = self.forward(tokens)
        return F.cross_entropy(z.reshape(-1, z.shape[-1]).double(), targets.reshape(-1).long(), ignore_index=-1)

    def greedy(self, prompt_ids, max_tokens):
        """The greedy continuation of prompt_ids (argmax, ties to the lower id), each step running
        the whole prefix again, with per-token (dropless) routing; stops at model.max_seq."""
        ids = list(prompt_ids)
        out = []
        while len(out) < max_tokens and len(ids) < self.cfg["model.max_seq"]:
            logits = self.forward(torch.tensor([ids], dtype=torch.long), dropless=True)[0, -1]
            nxt = int(torch.argmax(logits).item())
            out.append(nxt)
            ids.append(nxt)
        return out


def load(run_dir, dtype=torch.float64):
    cfg, meta = read_config(run_dir)
    weights = read_safetensors(os.path.join(run_dir, "model.safetensors"))
    return GptMoE(cfg, meta, weights, dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="largest accepted relative loss difference (default 1e-5 for an f32 run, 2e-2 for bf16)")
    ap.add_argument("--prompt-ids", help="comma-separated token ids: print their greedy continuation's ids instead")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens to generate with --prompt-ids (default 32)")
    ap.add_argument("--list-keys", action="store_true", help="print the config keys this loader implements and exit")
    args = ap.parse_args()
    if args.list_keys:
        print("\n".join(sorted(KNOWN_KEYS)))
        return 0
    if not args.run_dir:
        ap.error("RUN_DIR is required (a folder a finished `moelab train` wrote)")
    model = load(args.run_dir, getattr(torch, args.dtype))
    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            ap.error(f"--prompt-ids {args.prompt_ids!r}: give comma-separated integers, e.g. 1,2,3")
        if not prompt:
            ap.error("--prompt-ids: give at least one token id")
        with torch.no_grad():
            print(" ".join(str(t) for t in model.greedy(prompt, args.max_tokens)))
        return 0
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
