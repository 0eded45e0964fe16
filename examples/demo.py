"""make demo: a three-round chat with SmolLM2-135M-Instruct whose context lives in hcached between rounds.

Round 1 is generated under capture(); after each round the model's own cache is dropped. Every later round
restores the context by each method (recompute, kv, hidden, auto), prints its restore time and time to first
token, checks that all methods give the same greedy reply, and grows the context with that round (append).
Beside them, for comparison: recompute and hidden in one pass over all tokens (exact=False: no replay of the
decode steps, equal up to rounding), and no hcache at all (the model prefills the whole conversation again).
The daemon is killed with SIGKILL and restarted between rounds 2 and 3: the context comes back from disk.
Exits non-zero if the exact methods disagree.
"""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (make demo): make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from examples.smollm2 import ModelUnavailable, load
from hcache.client import HCacheClient
from hcache.daemon.process import DaemonProcess
from hcache.transformers import capture, restore

CTX = "chat-42"
TURNS = ["Suggest a name for a black cat.", "Why is that a good name?", "Write a short poem about the cat."]
METHODS = ("recompute", "kv", "hidden", "auto")  # exact: every one must give the same reply
ONE_PASS = ("recompute", "hidden")  # exact=False (kv reads are exact anyway)
NO_HCACHE = "no hcache: prefill"
CAPTURED_BY = "auto"  # the method whose generation is captured (appended): last, so the others see the old context
NEW_TOKENS = 30


class Chat:
    def __init__(self, model: torch.nn.Module, tokenizer: object) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.messages: list[dict[str, str]] = []

    def ids(self) -> torch.Tensor:
        """The whole conversation so far, templated, ending with the assistant's turn to speak."""
        out = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_tensors="pt")
        return out["input_ids"]

    def generate(self, ids: torch.Tensor, cache: object = None, n: int = NEW_TOKENS) -> tuple[torch.Tensor, object]:
        out = self.model.generate(ids, cache=cache, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                                  attention_mask=torch.ones_like(ids), pad_token_id=self.tokenizer.pad_token_id)
        return out.sequences, out.cache

    def reply_of(self, seq: torch.Tensor, prompt_len: int) -> str:
        """The reply as text, unstripped: templated again next round, it must give back the same tokens."""
        return self.tokenizer.decode(seq[0, prompt_len:], skip_special_tokens=True)


def restored_round(chat: Chat, client: HCacheClient, ids: torch.Tensor, method: str,
                   exact: bool = True) -> tuple[torch.Tensor, dict]:
    """Restore the context by `method`, continue the conversation; (sequence, timings). TTFT = restore + the
    forward of the new tokens that yields the first reply token; the rest of the reply continues on that cache."""
    t0 = time.perf_counter()
    cache, ctx_ids = restore(chat.model, client, CTX, method=method, exact=exact)
    t1 = time.perf_counter()
    n = ctx_ids.shape[1]
    if not torch.equal(ids[:, :n], ctx_ids):
        raise SystemExit(f"demo: the restored context ({n} tokens) is not a prefix of the conversation")
    seq, ttft_s = reply(chat, torch.cat([ctx_ids, ids[:, n:]], 1), cache, t0)
    return seq, {"restored": n, "new": ids.shape[1] - n, "restore_ms": (t1 - t0) * 1e3, "ttft_ms": ttft_s * 1e3}


def prefilled_round(chat: Chat, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The conversation continued without hcache: the model prefills all of it again; (sequence, timings)."""
    seq, ttft_s = reply(chat, ids, None, time.perf_counter())
    return seq, {"restored": 0, "new": ids.shape[1], "restore_ms": 0.0, "ttft_ms": ttft_s * 1e3}


def reply(chat: Chat, ids: torch.Tensor, cache: object, t0: float) -> tuple[torch.Tensor, float]:
    """Generate the reply to `ids` on `cache`; (sequence, seconds from t0 to its first token)."""
    first, cache = chat.generate(ids, cache, n=1)
    ttft_s = time.perf_counter() - t0
    seq, _ = chat.generate(first, cache, n=NEW_TOKENS - 1)
    return seq, ttft_s


def show_reply(text: str) -> None:
    print(textwrap.indent(textwrap.fill(text.strip(), 96), "    assistant> "))


def main() -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t = time.perf_counter()
    try:
        model, tokenizer = load()
    except ModelUnavailable as e:
        print(f"demo: SmolLM2 is not available: {e}", file=sys.stderr)
        return 2
    # Leave a core to hcached: torch's spinning threads slow down many-fold when they must share every core.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1)))
    cfg = model.config
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t:.1f} s ({cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, {cfg.num_key_value_heads} KV heads, {model.dtype}); "
          f"torch on {torch.get_num_threads()} thread(s)")
    chat = Chat(model, tokenizer)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hcache-demo-", dir="/var/tmp") as root:
        daemon = DaemonProcess(Path(root), n_dirs=2, dram="512MiB", slab_size="64MiB")
        try:
            daemon.start()
            print(f"started hcached (pid {daemon.proc.pid}) on {root}, 2 data dirs")
            for rnd, turn in enumerate(TURNS, start=1):
                chat.messages.append({"role": "user", "content": turn})
                ids = chat.ids()
                print(f"\nround {rnd}  user> {turn}")
                with HCacheClient(daemon.socket) as client:
                    if rnd == 1:
                        t0 = time.perf_counter()
                        with capture(model, client, CTX, store="both"):
                            seq, _ = chat.generate(ids)
                        print(f"  prefill {ids.shape[1]} tokens + {seq.shape[1] - ids.shape[1]} generated in "
                              f"{(time.perf_counter() - t0) * 1e3:.0f} ms under capture(store='both')")
                    else:
                        seq, same = restore_every_way(chat, client, ids)
                        if not same:
                            failures.append(f"round {rnd}: the methods gave different replies")
                    show_reply(chat.reply_of(seq, ids.shape[1]))
                    held = client.stat(CTX).n_tokens
                    print(f"  hcached holds {held} tokens of {CTX!r} (all but the reply's last, not yet through the "
                          "model); the model's own cache is dropped")
                chat.messages.append({"role": "assistant", "content": chat.reply_of(seq, ids.shape[1])})
                if rnd == 2:
                    daemon.kill()
                    daemon.start()
                    with HCacheClient(daemon.socket) as client:
                        after = client.stat(CTX).n_tokens
                    print(f"  kill -9 hcached, restarted (pid {daemon.proc.pid}): {CTX!r} holds {after} tokens")
                    if after != held:
                        failures.append(f"after kill -9 {CTX!r} holds {after} tokens, not {held}")
        finally:
            daemon.cleanup()  # SIGTERM: a clean stop, the arena file goes too
            print("\nstopped hcached")
    for f in failures:
        print(f"demo: FAILED: {f}", file=sys.stderr)
    if not failures:
        print("every exact method restored the context and gave the same replies, across a kill -9 of hcached")
    return 1 if failures else 0


def restore_every_way(chat: Chat, client: HCacheClient, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Continue the conversation from the context restored by each method; (the reply, whether the exact methods
    agree). The one-pass restores and the prefill without hcache are shown beside them, not required to agree."""
    results: dict[str, tuple[torch.Tensor, dict]] = {}
    for method in METHODS:
        if method == CAPTURED_BY:  # this round's tokens are appended to the context for the next round
            for other in ONE_PASS:
                results[f"{other} (one pass)"] = restored_round(chat, client, ids, other, exact=False)
            results[NO_HCACHE] = prefilled_round(chat, ids)
            with capture(chat.model, client, CTX, store="both"):  # keep every method possible
                results[method] = restored_round(chat, client, ids, method)
        else:
            results[method] = restored_round(chat, client, ids, method)
    first = results[METHODS[0]][1]
    print(f"  restored {first['restored']} tokens + {first['new']} new tokens:")
    print(f"  {'method':<22} {'restore ms':>10} {'TTFT ms':>8}  reply")
    ref = results[METHODS[0]][0]
    same = True
    for name in [*METHODS, *(f"{m} (one pass)" for m in ONE_PASS), NO_HCACHE]:
        seq, t = results[name]
        agree = torch.equal(seq, ref)
        exact = name in METHODS
        same &= agree or not exact
        verdict = "same" if agree else "DIFFERENT" if exact else "differs (not bit-exact)"
        restore_ms = f"{t['restore_ms']:.0f}" if name != NO_HCACHE else "-"
        print(f"  {name:<22} {restore_ms:>10} {t['ttft_ms']:>8.0f}  {verdict}"
              + ("  (captured: appended)" if name == CAPTURED_BY else ""))
    if not same:
        for name, (seq, _) in results.items():
            print(f"  {name}: {chat.reply_of(seq, ids.shape[1])!r}")
    return ref, same


if __name__ == "__main__":
    sys.exit(main())
