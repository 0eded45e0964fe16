"""capture() and restore() on each device this host has (CUDA ones are skipped without a GPU), and batches whose
rows are padded, through the real hcached."""

import copy

import pytest
import torch

from hcache.client import HCacheClient
from hcache.transformers import capture, restore
from tests.client.test_projection import VOCAB, model_of

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA)]
METHODS = ("hidden", "kv", "recompute", "auto")


@pytest.fixture(scope="module")
def hcached(tmp_path_factory):
    from hcache.daemon.process import DaemonProcess

    d = DaemonProcess(tmp_path_factory.mktemp("hcached"), dram="256MiB").start()
    yield d
    d.cleanup()


def _on(family: str, dtype: str, device: str) -> torch.nn.Module:
    return copy.deepcopy(model_of(family, dtype)).to(device)


def _ids(seed: int, n: int, device: str) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)


def _generate(model: torch.nn.Module, ids: torch.Tensor, cache: object = None, n: int = 16,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
    out = model.generate(ids, cache=cache, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                         attention_mask=torch.ones_like(ids) if mask is None else mask, pad_token_id=0)
    return out.sequences, out.cache


@CUDA
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_client_reads_straight_into_gpu_memory(hcached, dtype):
    model = _on("llama-gqa", dtype, "cpu")
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, f"gpu-{dtype}", store="both"), torch.no_grad():
            model(_ids(1, 200, "cpu"))
        for rep in ("hidden", "kv"):
            want = client.restore(f"gpu-{dtype}", rep)
            assert torch.equal(client.restore(f"gpu-{dtype}", rep, device="cuda").cpu(), want)
            out = torch.full_like(want, float("nan"), device="cuda")
            assert client.restore(f"gpu-{dtype}", rep, out=out) is out
            assert torch.equal(out.cpu(), want)
            part = client.restore(f"gpu-{dtype}", rep, layers=[1], start=63, end=130, device="cuda")
            assert torch.equal(part.cpu(), want[1:2, 63:130])


@CUDA
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha", "qwen3", "gemma2", "gpt2"])
def test_every_method_continues_the_conversation_on_the_gpu(hcached, family, dtype):
    model = _on(family, dtype, "cuda")
    first = _ids(0, 20, "cuda")
    seqs, cache = _generate(model, first, n=8)
    second = torch.cat([seqs, _ids(1, 6, "cuda")], 1)
    want, _ = _generate(model, second, cache)
    ctx = f"cuda-{family}-{dtype}"
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ctx, store="both"):
            assert torch.equal(_generate(model, first, n=8)[0], seqs)
        for method in METHODS:
            restored, stored = restore(model, client, ctx, method=method)
            assert stored.device.type == "cpu" and torch.equal(stored, seqs[:, :-1].cpu())
            assert restored.layers[0].keys.device.type == "cuda"
            got, _ = _generate(model, second, restored)
            assert torch.equal(got, want), method
        client.delete(ctx)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_rows_save_their_own_tokens_without_padding(hcached, device):
    model = _on("llama-mha", "fp32", device)
    lengths = (12, 7)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):  # left padding, as generate() wants for a decoder-only model
        ids[row, width - n :] = _ids(10 + row, n, "cpu")[0]
        mask[row, width - n :] = 1
    ids, mask = ids.to(device), mask.to(device)
    ctxs = [f"batch-{device}-{row}" for row in range(len(lengths))]
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ctxs, store="both"):
            seqs, cache = _generate(model, ids, n=5, mask=mask)
        full_mask = torch.cat([mask, torch.ones(len(lengths), 5, dtype=mask.dtype, device=device)], 1)
        for row, ctx in enumerate(ctxs):
            kept = full_mask[row, :-1].bool()  # the last token generated has not been through the model
            assert torch.equal(client.tokens(ctx), seqs[row, :-1][kept].cpu())
            by_kv, _ = restore(model, client, ctx, method="kv")
            by_hidden, _ = restore(model, client, ctx, method="hidden")
            for i, layer in enumerate(cache.layers):
                k, v = layer.keys[row][:, kept], layer.values[row][:, kept]
                assert torch.equal(by_kv.layers[i].keys[0], k) and torch.equal(by_kv.layers[i].values[0], v)
                # Projected from one row, not the padded batch: the same up to rounding.
                torch.testing.assert_close(by_hidden.layers[i].keys[0], k, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(by_hidden.layers[i].values[0], v, atol=1e-5, rtol=1e-4)
            client.delete(ctx)
