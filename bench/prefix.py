"""Shared prefixes through the real hcached: new conversations that open with a long system prompt hcached already
holds. Time to first token with hcache (lookup, restore of the stored prefix, prefill of the rest under capture of a
new context) against prefilling the whole prompt; disk bytes of many such conversations with sharing and without;
and the latency of a lookup as the contexts held grow to 100k."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import sharegpt
import torch
from report import Clock, git_info, log, quantile, run_and_save, subplots
from restore import DRAM, Hcached, device_info, device_slug, synchronizer

from hcache.client import AsyncHCacheClient, HCacheClient
from hcache.client.profiler import profile
from hcache.client.projection import fingerprint
from hcache.daemon.process import DaemonProcess
from hcache.layout.geometry import Geometry
from hcache.transformers import capture, lookup, restore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/, for the SmolLM2 loader
from examples import smollm2  # noqa: E402

SYSTEM_INTRO = ("You are a helpful assistant. The reference material below comes from earlier answers; use it when "
                "it is relevant to the user's question.\n\n")
USER_OPEN = "<|im_end|>\n<|im_start|>user\n"  # the system turn is cut short: this closes it
CUE = "<|im_end|>\n<|im_start|>assistant\n"
PROFILE_T = {"cpu": ((128, 512, 1024), 1), "cuda": ((512, 1024, 2048), 3)}
# Part 3: small contexts made without a model, one full chunk each (so each is keyed for lookups).
TINY = Geometry(num_layers=1, hidden_size=64, num_kv_heads=1, head_dim=64, dtype="float16")
TINY_MODEL = "bench-prefix-tiny"
TINY_TOKENS = 64
LEVELS = (1_000, 10_000, 100_000)
IN_FLIGHT = 64
VOCAB_IDS = 2**31 - 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="a directory for hcached's state and data; a fresh temp dir is made in it and removed")
    p.add_argument("--prefix-tokens", type=int, default=2048, help="tokens of the shared system prompt")
    p.add_argument("--question-tokens", type=int, default=64, help="a user question is cut to this many tokens")
    p.add_argument("--conversations", type=int, default=20,
                   help="new conversations whose TTFT is measured (after one more, unmeasured, to warm up)")
    p.add_argument("--stored-conversations", type=int, default=100,
                   help="conversations captured for the bytes comparison, with sharing and without")
    p.add_argument("--reply-tokens", type=int, default=16, help="greedy reply tokens of each stored conversation")
    p.add_argument("--lookup-samples", type=int, default=200, help="lookups timed on their own, hit and miss each")
    p.add_argument("--levels", type=int, nargs="*", default=list(LEVELS),
                   help="context counts at which lookup latency is measured (none: skip that part)")
    p.add_argument("--level-s", type=float, default=2.0, help="seconds of lookups per kind (hit, miss) and level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = p.parse_args()
    if args.prefix_tokens < 64 or args.prefix_tokens % 64:
        p.error("--prefix-tokens must be a positive multiple of 64 (lookups match whole 64-token chunks)")
    if min(args.question_tokens, args.conversations, args.stored_conversations, args.reply_tokens,
           args.lookup_samples) < 1 or args.level_s <= 0 or any(n < 1 for n in args.levels):
        p.error("counts and --level-s must be >= 1 (> 0)")
    return args


def spread(seconds: list[float]) -> dict:
    return {"p50": statistics.median(seconds), "p90": quantile(seconds, 0.9), "p99": quantile(seconds, 0.99),
            "max": max(seconds), "n": len(seconds)}


# -- the prompts ----------------------------------------------------------------------------------
def prompts(tokenizer: Any, args: argparse.Namespace) -> tuple[list[int], list[list[int]], dict]:
    """The shared system prompt (the chat template's system turn of ShareGPT answers, cut to --prefix-tokens) and the
    user turns after it: first user turns of other ShareGPT conversations (each cut to --question-tokens), distinct,
    one for each measured conversation, the warm-up and the stored ones."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    conversations, data = sharegpt.load()
    pool = sharegpt.sample(conversations, len(conversations), 1, args.seed)
    wanted = max(args.conversations + 1, args.stored_conversations)
    questions: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    used = 0
    for conv in pool:
        used += 1
        q = encode(conv.users[0].strip())[: args.question_tokens]
        if q and tuple(q) not in seen:
            seen.add(tuple(q))
            questions.append(q)
            if len(questions) == wanted:
                break
    answers, system = [], []
    for conv in pool[used:]:  # the reference material: answers of conversations not asked
        answers.append(conv.replies[0].strip())
        if sum(map(len, answers)) < 4 * args.prefix_tokens:  # ~4 characters a token: tokenize once enough is there
            continue
        text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_INTRO + "\n\n".join(answers)}],
                                             tokenize=False)
        system = encode(text)
        if len(system) >= args.prefix_tokens:
            break
    if len(system) < args.prefix_tokens:
        raise RuntimeError(f"ShareGPT's answers made a system prompt of {len(system)} tokens, short of "
                           f"{args.prefix_tokens}")
    user_open, cue = encode(USER_OPEN), encode(CUE)
    turns = [[*user_open, *q, *cue] for q in questions]
    info = {**data, "questions": len(questions), "answers_in_system_prompt": len(answers), "seed": args.seed,
            "question_tokens_p50": statistics.median(map(len, questions)), "turn_tokens_p50":
            statistics.median(map(len, turns))}
    return system[: args.prefix_tokens], turns, info


def generate(model: torch.nn.Module, ids: torch.Tensor, cache: object, n: int, clock: Clock | None = None
             ) -> list[int]:
    out = model.generate(ids, cache=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones_like(ids), pad_token_id=0, streamer=clock)
    return out[0, ids.shape[1]:].tolist()


def store_system(model: torch.nn.Module, client: HCacheClient, system: list[int], share: bool) -> float:
    """Prefill the system prompt once under capture (context "system"), until durable; seconds taken."""
    start = time.perf_counter()
    with capture(model, client, "system", share=share):
        model(input_ids=torch.tensor([system], device=model.device), use_cache=True, logits_to_keep=1)
    client.flush()
    return time.perf_counter() - start


# -- 1: time to first token -----------------------------------------------------------------------
def ttft(model: torch.nn.Module, client: HCacheClient, system: list[int], turns: list[list[int]],
         args: argparse.Namespace) -> dict:
    """Each new conversation's TTFT two ways, taken in turn (each conversation starting with the other): hcache
    (lookup, restore(tokens=ids) of the stored prefix, generate the rest under capture of a new context) and a
    prefill of the whole prompt. Conversation 0 warms up and is not counted."""
    device = model.device
    sync = synchronizer(device)
    store_s = store_system(model, client, system, share=True)
    log(f"system prompt of {len(system)} tokens stored in {store_s:.1f} s")
    rows = []
    for i, turn in enumerate(turns[: args.conversations + 1]):
        ids = torch.tensor([system + turn], device=device)
        row: dict = {"conversation": i, "tokens": ids.shape[1], "warm_up": i == 0}
        for way in (("hcache", "prefill") if i % 2 == 0 else ("prefill", "hcache")):
            clock = Clock()
            sync()
            start = time.perf_counter()
            if way == "prefill":
                first = generate(model, ids, None, 1, clock)
                row["prefill"] = {"ttft_s": clock.times[1] - start, "first_token": first[0]}
                continue
            n = lookup(model, client, ids)
            looked = time.perf_counter()
            cache, held = restore(model, client, tokens=ids)
            sync()
            restored = time.perf_counter()
            with capture(model, client, f"conv-{i}"):
                first = generate(model, ids, cache, 1, clock)
            row["hcache"] = {"ttft_s": clock.times[1] - start, "lookup_s": looked - start,
                             "restore_s": restored - looked, "looked_up": n, "restored": held.shape[1],
                             "capture_close_s": time.perf_counter() - clock.times[1], "first_token": first[0]}
            if n != len(system) or held.shape[1] != len(system):
                raise RuntimeError(f"conversation {i}: lookup found {n} tokens and restore {held.shape[1]}, not the "
                                   f"{len(system)} of the stored system prompt")
        row["first_tokens_agree"] = row["hcache"]["first_token"] == row["prefill"]["first_token"]
        rows.append(row)
        log(f"conversation {i}{' (warm-up)' if i == 0 else ''}: {row['tokens']} tokens, TTFT hcache "
            f"{row['hcache']['ttft_s'] * 1e3:.0f} ms (restore {row['hcache']['restore_s'] * 1e3:.0f}), prefill "
            f"{row['prefill']['ttft_s'] * 1e3:.0f} ms")
    # a lookup on its own: a request that opens with the system prompt, and one that holds nothing stored
    hit = torch.tensor([system + turns[0]])
    miss = torch.randint(0, model.config.vocab_size, hit.shape, generator=torch.Generator().manual_seed(args.seed))
    fp = fingerprint(model)
    calls = {"": lambda ids: lookup(model, client, ids), "client_": lambda ids: client.lookup(fp, ids)}
    alone = {}
    for name, ids in (("hit", hit), ("miss", miss)):
        for via, call in calls.items():
            seconds, found = [], set()
            for _ in range(args.lookup_samples):
                start = time.perf_counter()
                found.add(call(ids))
                seconds.append(time.perf_counter() - start)
            alone[via + name] = {**spread(seconds), "tokens_found": sorted(found)}
    start = time.perf_counter()
    for _ in range(args.lookup_samples):
        fingerprint(model)
    alone["fingerprint_s"] = (time.perf_counter() - start) / args.lookup_samples
    measured = [r for r in rows if not r["warm_up"]]
    ways = ("hcache", "prefill")
    secs = {w: [r[w]["ttft_s"] for r in measured] for w in ways}
    return {
        "system_store_s": store_s,
        "ttft_p50_s": {w: statistics.median(secs[w]) for w in ways},
        "ttft_p90_s": {w: quantile(secs[w], 0.9) for w in ways},
        "ttft_p50_vs_prefill": statistics.median(secs["prefill"]) / statistics.median(secs["hcache"]),
        "ttft_p90_vs_prefill": quantile(secs["prefill"], 0.9) / quantile(secs["hcache"], 0.9),
        "restore_s_p50": statistics.median(r["hcache"]["restore_s"] for r in measured),
        "restore_share_of_ttft_p50": statistics.median(r["hcache"]["restore_s"] / r["hcache"]["ttft_s"]
                                                       for r in measured),
        "lookup_in_ttft_s_p50": statistics.median(r["hcache"]["lookup_s"] for r in measured),
        "lookup_s": alone["hit"], "lookup_alone": alone,
        "lookup_alone_note": "hit/miss: hcache.transformers.lookup(model, client, ids), which fingerprints the model "
                             "at each call (fingerprint_s); client_hit/client_miss: HCacheClient.lookup(fingerprint, "
                             "ids) with the fingerprint computed once; a request of the system prompt and the first "
                             "question, and one of as many random ids",
        "conversations_slower_than_prefill": sum(r["hcache"]["ttft_s"] >= r["prefill"]["ttft_s"] for r in measured),
        "first_tokens_agree": sum(r["first_tokens_agree"] for r in measured),
        "conversations_measured": len(measured), "conversations": rows,
    }


# -- 2: bytes stored ------------------------------------------------------------------------------
def stored_bytes(model: torch.nn.Module, hc: Hcached, system: list[int], turns: list[list[int]], share: bool,
                 args: argparse.Namespace) -> dict:
    """Disk bytes of --stored-conversations conversations (system prompt, question, a short greedy reply, captured)
    in a fresh hcached. Shared: each restores the stored prefix found by its tokens, and its capture references the
    prefix's chunks. Not shared: the system prompt is stored with share=False and each conversation restores it by
    id; its capture (share=False) forks it, which copies every chunk, then saves the rest: each keeps all of its
    tokens' bits, the same bytes as a prefill of the whole prompt saved with share=False, without 100 prefills.
    (A fork takes its source's share setting: capture(share=False) of a cache restored from a shared context makes a
    shared context.)"""
    started = time.perf_counter()
    hc.start()
    try:
        with hc.client() as client:
            store_system(model, client, system, share=share)
            base = client.status()
            for i, turn in enumerate(turns[: args.stored_conversations]):
                ids = torch.tensor([system + turn], device=model.device)
                if share:
                    cache, held = restore(model, client, tokens=ids)
                else:
                    cache, held = restore(model, client, "system")
                if held.shape[1] != len(system):
                    raise RuntimeError(f"conversation {i}: restored {held.shape[1]} tokens, not {len(system)}")
                with capture(model, client, f"conv-{i}", share=share):
                    generate(model, ids, cache, args.reply_tokens)
                if (i + 1) % 25 == 0:
                    log(f"{'shared' if share else 'unshared'}: {i + 1} conversations stored, "
                        f"{client.status()['used'] / 2**20:.0f} MiB used")
            client.flush()
            status = client.status()
            n = min(args.stored_conversations, len(turns))
            info = client.stat("conv-0", detail=True)
            placement = info.raw["placement"]
            tokens = sum(client.stat(f"conv-{i}").n_tokens for i in range(n))
    finally:
        hc.stop()
    return {"conversations": n, "tokens": tokens, "used": status["used"], "logical": status["logical"],
            "system_prompt_used": base["used"], "conversations_used": status["used"] - base["used"],
            "per_conversation": (status["used"] - base["used"]) / n,
            "shared_chunks_of_conv_0": {rep: sorted({s["shared"] for s in placement if s["rep"] == rep})
                                        for rep in sorted({s["rep"] for s in placement})},
            "runtime_s": time.perf_counter() - started}


# -- 3: lookup latency against contexts held ------------------------------------------------------
async def timed_calls(call: Any, seconds: float) -> dict:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        await call()
        out.append(time.perf_counter() - start)
    return spread(out)


async def lookup_levels(socket: str, levels: list[int], prefix_tokens: int, level_s: float, seed: int
                        ) -> list[dict]:
    """Contexts of one 64-token chunk each, distinct random ids, appended without a flush IN_FLIGHT at a time
    (the flusher writes them behind); at each level, once all is flushed, lookups of a --prefix-tokens request that
    hits a stored prefix of that length and of one that misses."""
    client = await AsyncHCacheClient.connect(socket)
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(1, TINY_TOKENS, 2, TINY.num_kv_heads, TINY.head_dim, generator=gen).half()
    layers = {"kv": [0]}
    try:
        hit = torch.randint(0, VOCAB_IDS, (prefix_tokens,), generator=gen)
        miss = torch.randint(0, VOCAB_IDS, (prefix_tokens,), generator=gen)
        await client.open("hit", model=TINY_MODEL, geometry=TINY, layers=layers)
        await client.append("hit", hit, {"kv": kv.repeat(1, prefix_tokens // TINY_TOKENS, 1, 1, 1)})
        await client.flush("hit")
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int, ids: torch.Tensor) -> None:
            async with gate:
                await client.open(f"c{i}", model=TINY_MODEL, geometry=TINY, layers=layers)
                await client.append(f"c{i}", ids, {"kv": kv})

        held, rows = 0, []
        for level in sorted(levels):
            ids = torch.randint(0, VOCAB_IDS, (level - held, TINY_TOKENS), generator=gen)
            started = time.perf_counter()
            await asyncio.gather(*(one(held + j, ids[j]) for j in range(level - held)))
            rate = (level - held) / (time.perf_counter() - started)
            await client.flush()
            filled_s = time.perf_counter() - started
            found = {"hit": await client.lookup(TINY_MODEL, hit), "miss": await client.lookup(TINY_MODEL, miss),
                     "last_context": await client.lookup(TINY_MODEL, ids[-1])}
            if found != {"hit": prefix_tokens, "miss": 0, "last_context": TINY_TOKENS}:
                raise RuntimeError(f"at {level} contexts lookups found {found}")
            held = level
            row = {"contexts": level, "filled_per_s": rate, "fill_and_flush_s": filled_s, "found": found,
                   "hit": await timed_calls(lambda: client.lookup(TINY_MODEL, hit), level_s),
                   "miss": await timed_calls(lambda: client.lookup(TINY_MODEL, miss), level_s)}
            rows.append(row)
            log(f"{level} contexts (added at {rate:.0f}/s): lookup hit p50 {row['hit']['p50'] * 1e3:.3f} ms "
                f"p99 {row['hit']['p99'] * 1e3:.3f}, miss p50 {row['miss']['p50'] * 1e3:.3f} ms "
                f"p99 {row['miss']['p99'] * 1e3:.3f}")
    finally:
        await client.close()
    return rows


def lookup_at_contexts(root: Path, args: argparse.Namespace) -> dict:
    if not args.levels:
        return {}
    started = time.perf_counter()
    d = DaemonProcess(root, engine="auto", dram="1GiB", slab_size="256MiB").start()
    try:
        rows = asyncio.run(lookup_levels(d.socket, args.levels, args.prefix_tokens, args.level_s, args.seed))
    finally:
        d.cleanup()
    log(f"lookups against contexts held: {time.perf_counter() - started:.0f} s")
    return {"geometry": TINY.to_dict(), "tokens_per_context": TINY_TOKENS, "request_tokens": args.prefix_tokens,
            "level_s": args.level_s, "runtime_s": time.perf_counter() - started,
            "levels": {str(r["contexts"]): r for r in rows}}


# -- the run --------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, root: Path) -> dict:
    started = time.perf_counter()
    os.environ["HCACHE_HOME"] = str(root / "home")  # the measured profile goes here, not to the user's state dir
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = smollm2.load()
    model = model.to(device)
    system, turns, data = prompts(tokenizer, args)
    log(f"system prompt {len(system)} tokens; {len(turns)} user turns, median {data['turn_tokens_p50']} tokens")
    torch.ones(1 << 20).sum()  # starts the main thread's OpenMP workers, before any hcache thread exists
    dram = DRAM[device.type]
    with torch.inference_mode():
        hc = Hcached(root / "ttft", dram=dram)
        hc.start()
        try:
            with hc.client() as client:
                t_values, repeats = PROFILE_T[device.type]
                prof = profile(model, client, t_values, repeats=repeats)  # kept in HCACHE_HOME: capture, auto use it
                log(f"profiled: c_h {prof.c_h}, c_tok {prof.c_tok}, reads {prof.read_bandwidth / 1e9:.2f} GB/s")
                first = ttft(model, client, system, turns, args)
        finally:
            hc.stop()
        stored = {}
        for share in (True, False):
            name = "shared" if share else "unshared"
            stored[name] = stored_bytes(model, Hcached(root / f"bytes-{name}", dram=dram), system, turns, share, args)
            got = stored[name]
            log(f"{name}: {got['conversations']} conversations, {got['used'] / 2**20:.0f} MiB used, "
                f"{got['per_conversation'] / 2**20:.2f} MiB a conversation ({got['runtime_s']:.0f} s)")
    at_contexts = lookup_at_contexts(root / "contexts", args)
    sh, un = stored["shared"], stored["unshared"]
    return {
        "benchmark": "prefix", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_slug(device), "host": device_info(root, device), "git": git_info(),
        "runtime_s": time.perf_counter() - started, "model": "smollm2", "data": data,
        "setup": {k: getattr(args, k) for k in ("prefix_tokens", "question_tokens", "conversations",
                                                "stored_conversations", "reply_tokens", "lookup_samples", "levels",
                                                "level_s", "seed")},
        "ttft": "hcache: lookup + restore(tokens=ids) of the stored system prompt + generate of the rest under capture "
                "of a new context, to the first token; prefill: generate of the whole prompt, no hcache; the two in "
                "turn, each conversation starting with the other; the shared prefix's chunks are in hcached's arena "
                "after the first restore (a hot prefix)",
        "profile": prof.to_dict(),
        **{k: v for k, v in first.items() if k != "conversations"},
        "bytes": {"shared": sh["used"], "unshared": un["used"], "ratio": un["used"] / sh["used"],
                  "per_conversation": {"shared": sh["per_conversation"], "unshared": un["per_conversation"]},
                  "per_conversation_ratio": un["per_conversation"] / sh["per_conversation"],
                  "shared_logical": sh["logical"], "detail": stored,
                  "unshared_how": "system prompt stored with share=False, restored by id, each conversation captured "
                                  "with share=False (its fork copies every chunk): the bytes of whole prompts saved "
                                  "apart, checked equal to a prefill of the whole prompt under capture(share=False)"},
        "lookup_at_contexts": at_contexts.get("levels", {}),
        "lookup_at_contexts_setup": {k: v for k, v in at_contexts.items() if k != "levels"},
        "conversations": first["conversations"],
    }


def plot(result: dict) -> Any:
    fig, (left, middle, right) = subplots(1, 3, figsize=(15, 4.4))
    rows = [r for r in result["conversations"] if not r["warm_up"]]
    for way, color in (("prefill", "tab:gray"), ("hcache", "black")):
        left.scatter([r["conversation"] for r in rows], [r[way]["ttft_s"] * 1e3 for r in rows], s=14, color=color,
                     label=f"{way} (p50 {result['ttft_p50_s'][way] * 1e3:.0f} ms)")
        left.axhline(result["ttft_p50_s"][way] * 1e3, color=color, linestyle=":", linewidth=1)
    left.scatter([r["conversation"] for r in rows], [r["hcache"]["restore_s"] * 1e3 for r in rows], s=10,
                 marker="x", color="tab:green", label="hcache: its restore")
    left.set_yscale("log")
    left.set_ylim(top=max(r["prefill"]["ttft_s"] for r in rows) * 1e3 * 6)  # room for the legend above the points
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("new conversation")
    left.set_ylabel("TTFT ms")
    left.legend(fontsize=8, loc="upper center", ncol=2)
    left.set_title(f"{result['setup']['prefix_tokens']}-token system prompt + a question: prefill / hcache "
                   f"{result['ttft_p50_vs_prefill']:.2f}x at p50", fontsize=9)
    b = result["bytes"]
    n = b["detail"]["shared"]["conversations"]
    xs = range(2)
    middle.bar(xs, [b["shared"] / 2**20, b["unshared"] / 2**20], color=["black", "tab:gray"])
    for x, key in zip(xs, ("shared", "unshared"), strict=True):
        middle.text(x, b[key] / 2**20, f"{b[key] / 2**20:.0f} MiB\n{b['per_conversation'][key] / 2**20:.2f} MiB/conv",
                    ha="center", va="bottom", fontsize=8)
    middle.set_ylim(0, b["unshared"] / 2**20 * 1.18)
    middle.set_xticks(list(xs), ["shared (default)", "share=False"])
    middle.set_ylabel("disk bytes used, MiB")
    middle.set_title(f"{n} conversations stored: {b['ratio']:.1f}x less with sharing", fontsize=9)
    levels = result["lookup_at_contexts"]
    if levels:
        x = [int(k) for k in levels]
        for kind, color in (("hit", "black"), ("miss", "tab:blue")):
            right.plot(x, [levels[k][kind]["p50"] * 1e3 for k in levels], "-o", color=color, label=f"{kind} p50")
            right.plot(x, [levels[k][kind]["p99"] * 1e3 for k in levels], ":x", color=color, label=f"{kind} p99")
        right.set_xscale("log")
        right.set_ylim(bottom=0)
        right.legend(fontsize=8)
    right.set_xlabel("contexts held by hcached")
    right.set_ylabel("lookup latency ms")
    right.set_title(f"lookup of a {result['setup']['prefix_tokens']}-token request", fontsize=9)
    return fig


def summary(result: dict) -> str:
    p50, p90 = result["ttft_p50_s"], result["ttft_p90_s"]
    b = result["bytes"]
    lines = [f"smollm2 on {result['device']}: {result['setup']['prefix_tokens']}-token system prompt stored, "
             f"{result['conversations_measured']} new conversations (question median "
             f"{result['data']['question_tokens_p50']} tokens); {result['runtime_s']:.0f} s",
             f"{'TTFT':8} {'p50 ms':>8} {'p90 ms':>8}"]
    for way in ("hcache", "prefill"):
        lines.append(f"{way:8} {p50[way] * 1e3:8.1f} {p90[way] * 1e3:8.1f}")
    lines += [f"  prefill / hcache: {result['ttft_p50_vs_prefill']:.2f}x at p50, {result['ttft_p90_vs_prefill']:.2f}x "
              f"at p90; restore {result['restore_s_p50'] * 1e3:.0f} ms p50, "
              f"{result['restore_share_of_ttft_p50']:.0%} of hcache's TTFT; first tokens agree "
              f"{result['first_tokens_agree']}/{result['conversations_measured']}",
              f"  lookup alone: hit p50 {result['lookup_alone']['hit']['p50'] * 1e3:.2f} ms, miss p50 "
              f"{result['lookup_alone']['miss']['p50'] * 1e3:.2f} ms (HCacheClient.lookup with the fingerprint at "
              f"hand: {result['lookup_alone']['client_hit']['p50'] * 1e3:.2f} / "
              f"{result['lookup_alone']['client_miss']['p50'] * 1e3:.2f} ms; fingerprint(model) "
              f"{result['lookup_alone']['fingerprint_s'] * 1e3:.2f} ms)",
              f"  bytes for {b['detail']['shared']['conversations']} conversations: shared "
              f"{b['shared'] / 2**20:.0f} MiB ({b['per_conversation']['shared'] / 2**20:.2f} MiB each), unshared "
              f"{b['unshared'] / 2**20:.0f} MiB ({b['per_conversation']['unshared'] / 2**20:.2f} MiB each): "
              f"{b['ratio']:.1f}x ({b['per_conversation_ratio']:.1f}x a conversation)"]
    for level, row in result["lookup_at_contexts"].items():
        lines.append(f"  lookup at {int(level):>7} contexts: hit p50/p99 {row['hit']['p50'] * 1e3:.3f}/"
                     f"{row['hit']['p99'] * 1e3:.3f} ms, miss {row['miss']['p50'] * 1e3:.3f}/"
                     f"{row['miss']['p99'] * 1e3:.3f} ms")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    result = run_and_save(args.dir, "hcache-prefix-", lambda root: measure(args, root),
                          lambda r: f"prefix-{r['device']}", plot)
    print(json.dumps(result) if args.json else summary(result))


if __name__ == "__main__":
    main()
