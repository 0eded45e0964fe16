"""make demo: start hcached on a temporary directory, save a two-round context, restore it, stop the daemon."""

import tempfile
import time
from pathlib import Path

import torch

from hcache.client import HCacheClient
from hcache.daemon.process import DaemonProcess
from hcache.layout.geometry import Geometry
from hcache.layout.units import format_size

# A Llama-2-7B layer (4096 wide, 32 KV heads) cut down to 4 layers so the demo runs anywhere.
GEOMETRY = Geometry(num_layers=4, hidden_size=4096, num_kv_heads=32, head_dim=128, dtype="bfloat16")
LAYERS = {"hidden": [0, 1, 2], "kv": [3]}  # what a plan might choose: hidden for most layers, K/V for one


def round_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = GEOMETRY
    ids = torch.randint(0, 32_000, (n,), generator=gen)
    hidden = torch.randn(len(LAYERS["hidden"]), n, g.hidden_size, generator=gen).to(torch.bfloat16)
    kv = torch.randn(len(LAYERS["kv"]), n, 2, g.num_kv_heads, g.head_dim, generator=gen).to(torch.bfloat16)
    return ids, {"hidden": hidden, "kv": kv}


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="hcache-demo-", dir="/var/tmp") as root:
        daemon = DaemonProcess(Path(root), n_dirs=2, dram="512MiB", slab_size="64MiB").start()
        print(f"started hcached (pid {daemon.proc.pid}) on {root} with 2 data dirs, socket {daemon.socket}")
        try:
            saved = []
            with HCacheClient(daemon.socket) as client:
                print(f"io engine: {client.status()['engine']}")
                client.open("chat-42", model="demo-llama-4L", geometry=GEOMETRY, layers=LAYERS)
                for rnd, n in enumerate((1000, 300), start=1):
                    ids, data = round_data(n, gen)
                    saved.append((ids, data))
                    t = time.perf_counter()
                    total = client.append("chat-42", ids, data)
                    client.flush("chat-42")
                    nbytes = sum(v.numel() * v.element_size() for v in data.values())
                    print(f"round {rnd}: saved {n} tokens ({format_size(nbytes)}) in "
                          f"{(time.perf_counter() - t) * 1e3:.0f} ms, durable; context holds {total} tokens")
            daemon.restart()
            print("restarted hcached: the arena is empty, everything comes back from disk")
            with HCacheClient(daemon.socket) as client:
                t = time.perf_counter()
                hidden = client.restore("chat-42", "hidden")
                kv = client.restore("chat-42", "kv")
                tokens = client.tokens("chat-42")
                ms = (time.perf_counter() - t) * 1e3
                ok = (torch.equal(hidden, torch.cat([d["hidden"] for _, d in saved], 1))
                      and torch.equal(kv, torch.cat([d["kv"] for _, d in saved], 1))
                      and torch.equal(tokens, torch.cat([ids for ids, _ in saved])))
                print(f"restored {tokens.numel()} tokens: hidden {list(hidden.shape)}, kv {list(kv.shape)} "
                      f"in {ms:.0f} ms — bit-exact: {ok}")
                if not ok:
                    raise SystemExit("demo: restored data differs from what was saved")
        finally:
            daemon.stop()
            daemon.cleanup()
            print("stopped hcached")


if __name__ == "__main__":
    main()
