"""The GPU suite: every CUDA measurement of issue 17 in one command, one output folder.

Steps, in order, each a subprocess with its own wall-clock budget (and all of them under one
``--deadline``); a step that fails or runs out of time is recorded (status, exit code, the
tail of its log) and the suite goes on with the next one:

1. ``pytest``      ``pytest -m gpu tests/test_gpu.py``: pruners in fp16/bf16 vs fp32 on the CPU,
                   session / cacher / retrieval memory vs the CPU (tiny random models);
2. ``pruning``     ``benchmarks/pruning_overhead.py`` on CUDA fp16 and bf16, eager, plus the
                   per-frame call through a CUDA graph and through ``torch.compile``;
3. ``vit_cache``   ``benchmarks/vit_cache.py``: the whole Qwen2.5-VL-7B encoder (32 blocks),
                   bf16, eager, dense vs STC-Cacher, on the clips;
4. ``prefill``     ``benchmarks/prefill_pruning.py``: the whole 7B (28 LLM layers, 32 vision
                   blocks), bf16, dense vs keep ratios 0.1 / 0.25 and the paper's thresholds,
                   with time to first answer token (criterion margin 0.1);
5. ``long_stream`` ``benchmarks/long_stream_memory.py`` on CUDA: ``memory_allocated`` per
                   policy over 30 video-minutes and the peaks (28 layers of the 7B's width);
6. ``bench``       ``streampress bench --model random:qwen2.5-vl-7b --device cuda --dtype
                   bfloat16`` on the first clip.

Output folder (``--out``; default ``$OUT`` if set, else ``./gpu-suite-out``), rewritten after
every step so that a run cut short still leaves what it measured: ``suite.json`` (the
environment, every step's command, status, timings, log tail and parsed results),
``suite.md`` (a summary with the issue's acceptance checks), ``suite.log`` (every step's full
log) and the two plots ``long_stream_memory.png`` and ``bench.png`` when they were made: five
files, in one folder (the device tool returns at most 8 files, 2 folders deep). Scratch files
go to ``--work`` (default: a temporary folder).

Clips: ``--clips FOLDER`` (video files in it, sorted by name). A clip folder beside the
checkout does not travel to the device machine: copy the clips into an ignored folder of the
checkout first (``--prepare`` does: ``.gpu-clips/``) and name it in the device call's
``carry``. Without ``--clips`` (or when the folder has no videos, or PyAV is missing) the
suite makes synthetic clips: folders of PNG frames (moving shapes and a static stretch).

``--rehearse``: the same steps with the same argument wiring on the CPU, at tiny sizes (a few
seconds each; the pytest step runs the CUDA tests CPU against CPU through
``STREAMPRESS_GPU_TEST_DEVICE=cpu``); what needs CUDA (graph capture) is skipped with its
reason. ``tests/test_gpu_suite.py`` runs it, so a typo costs no device minute.

    python benchmarks/gpu_suite.py --prepare                    # here: clips into .gpu-clips/
    python benchmarks/gpu_suite.py --clips .gpu-clips --out $OUT --deadline 360   # on the GPU
    python benchmarks/gpu_suite.py --rehearse --out /tmp/rehearsal                # CPU rehearsal
    python benchmarks/gpu_suite.py --steps prefill,bench ...                      # a rerun of some
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm")
STEP_NAMES = ["pytest", "pruning", "vit_cache", "prefill", "long_stream", "bench"]
#: Per-step wall-clock ceilings in seconds (GPU run; the rehearsal uses REHEARSE_BUDGET).
GPU_BUDGET = {"pytest": 90, "pruning": 120, "vit_cache": 90, "prefill": 120, "long_stream": 140, "bench": 120}
DEFAULT_DEADLINE = 360  # the whole GPU run; the device call's timeout_s adds a minute for the start
REHEARSE_BUDGET = 90
MIN_STEP_SECONDS = 20  # a step is not started with less time than this left before the deadline
LOG_TAIL = 3000
# The pytest subset of the rehearsal: one pruner in each budget mode and dtype, and every session kind.
REHEARSE_PYTEST_K = "(streaming_assistant and 16x16x128) or retrieval or bf16_close"
# The acceptance figures (GPU run only).
ACCEPT_PRUNING_MS = 0.1
ACCEPT_VIT_RATIO = 0.75
ACCEPT_PREFILL_MARGIN = 0.1
DEFAULT_CLIPS_SOURCE = ROOT.parent / "shared" / "data" / "videos"
PREPARED_CLIPS = ROOT / ".gpu-clips"


@dataclass
class Step:
    name: str
    title: str
    cmd: list[str]
    budget: float
    env: dict = field(default_factory=dict)
    parse: object = None  # () -> dict of parsed results (may raise)
    files: list = field(default_factory=list)  # (produced path, name under --out) to keep


# ----------------------------------------------------------------------- environment
def _src_on_path() -> None:
    """Put the checkout's ``src`` first on ``sys.path`` (the package without install), once;
    imports of the package stay inside the functions that need them, so this module loads fast."""
    src = str(ROOT / "src")
    if sys.path[:1] != [src]:
        sys.path.insert(0, src)


def _run_quiet(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def nvidia_smi() -> dict | None:
    """Name, driver, memory, clocks and temperature of every GPU (None without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ["name", "driver_version", "memory.total", "memory.used", "clocks.sm", "clocks.mem",
              "temperature.gpu", "utilization.gpu", "power.draw"]
    text = _run_quiet(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"])
    if text is None:
        return {"error": "nvidia-smi failed"}
    gpus = [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in text.splitlines() if line.strip()]
    cuda = _run_quiet(["nvidia-smi"])
    version = None
    if cuda:
        for part in cuda.split("|"):
            if "CUDA Version" in part:
                version = part.split("CUDA Version:")[-1].strip()
    return {"gpus": gpus, "driver_cuda_version": version}


def environment(env: dict, in_process: bool = False) -> dict:
    """Python, torch, CUDA and package versions as the steps see them (one subprocess; with
    ``in_process``, here: the ``--fork`` rehearsal, whose steps are this process's children)."""
    probe = (
        "import json, platform, importlib\n"
        "d = {'python': platform.python_version(), 'machine': platform.machine()}\n"
        "import torch\n"
        "d.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),"
        " cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)\n"
        "if d['cuda_available']:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update(device=p.name, capability=f'{p.major}.{p.minor}', multiprocessors=p.multi_processor_count,"
        " device_memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())\n"
        "import importlib.metadata as md, importlib.util as iu\n"
        "for name, dist in (('transformers', 'transformers'), ('av', 'av'), ('numpy', 'numpy'), ('PIL', 'pillow'),"
        " ('triton', 'triton'), ('matplotlib', 'matplotlib'), ('pytest', 'pytest')):\n"
        "    if iu.find_spec(name) is None:\n"
        "        d[name] = 'missing'\n"
        "        continue\n"
        "    try:\n"
        "        d[name] = md.version(dist)\n"
        "    except md.PackageNotFoundError:\n"
        "        d[name] = 'present'\n"
        "print(json.dumps(d))\n"
    )
    if in_process:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(probe, {})
        info = json.loads(buf.getvalue())
    else:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=120)
        try:
            info = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            info = {"error": (out.stderr or out.stdout)[-LOG_TAIL:]}
    _src_on_path()
    from streampress.bench.host import cpu_name

    info.update(host=platform.node(), cpu_count=os.cpu_count(), cpu=cpu_name(), executable=sys.executable)
    smi = nvidia_smi()
    if smi is not None:
        info["nvidia_smi"] = smi
        if smi.get("gpus"):
            info.setdefault("device", smi["gpus"][0].get("name"))
            info["driver"] = smi["gpus"][0].get("driver_version")
    return info


# ----------------------------------------------------------------------------- clips
def find_clips(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())


def synthetic_clips(work: Path, count: int, frames: int, side: int) -> list[Path]:
    """``count`` folders of PNG frames (the package's synthetic video, different seeds)."""
    _src_on_path()
    from PIL import Image

    from streampress.bench.synthetic import synthetic_video

    out = []
    for i in range(count):
        folder = work / "clips" / f"synthetic_{i}"
        folder.mkdir(parents=True, exist_ok=True)
        images, _ = synthetic_video(frames, size=(side, side), seed=i)
        for j, image in enumerate(images):
            Image.fromarray(image).save(folder / f"frame_{j:04d}.png")
        out.append(folder)
    return out


# ----------------------------------------------------------------------------- steps
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def parse_junit(path: Path) -> dict:
    """Counts, failures and the recorded properties of a junit XML file."""
    root = ET.parse(path).getroot()
    cases, counts = [], {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in root.iter("testcase"):
        name = case.get("name")
        status = "passed"
        message = None
        for tag, st in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                status, message = st, (el.get("message") or "")[:500]
                break
        counts[status] += 1
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        entry = {"test": name, "status": status, "seconds": float(case.get("time") or 0)}
        if props:
            entry["properties"] = props
        if message:
            entry["message"] = message
        cases.append(entry)
    differing = sum(int(c.get("properties", {}).get("differing_positions", 0)) for c in cases)
    rel = [float(c["properties"]["logits_rel_err"]) for c in cases if "logits_rel_err" in c.get("properties", {})]
    return {**counts, "pruner_differing_positions_total": differing,
            "session_logits_rel_err_max": max(rel) if rel else None, "tests": cases}


def build_steps(rehearse: bool, clips: list[Path], work: Path) -> list[Step]:
    py = sys.executable
    r = rehearse
    dev = "cpu" if r else "cuda"
    first = str(clips[0])
    steps = []

    junit = work / "pytest.xml"
    cmd = [py, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rfEs", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1", f"--junitxml={junit}"]
    if r:
        cmd += ["-k", REHEARSE_PYTEST_K]
    steps.append(Step("pytest", "pytest -m gpu (CUDA variants vs CPU)", cmd, 0,
                      env={"STREAMPRESS_GPU_TEST_DEVICE": dev}, parse=lambda: parse_junit(junit)))

    pj = work / "pruning.json"
    cmd = [py, str(BENCH / "pruning_overhead.py"), "--json", str(pj), "--fast-paths", "cudagraph,compile"]
    if r:
        cmd += ["--reps", "3", "--warmup", "1", "--threads", "1", "--targets", "cpu:bfloat16", "--shapes", "4x4x64",
                "--methods", "streaming_assistant", "stc", "--fast-methods", "streaming_assistant",
                "--compile-backend", "eager"]
    else:
        cmd += ["--reps", "300", "--warmup", "30", "--targets", "cuda:float16,cuda:bfloat16",
                "--fast-methods", "streaming_assistant,stc", "--compile-backend", "inductor",
                "--compile-mode", "reduce-overhead"]
    steps.append(Step("pruning", "pruning_overhead.py (fp16/bf16, eager, CUDA graph, torch.compile)", cmd, 0,
                      parse=lambda: _read_json(pj)))

    vj = work / "vit_cache.json"
    cmd = [py, str(BENCH / "vit_cache.py"), "--no-default-clips", *map(str, clips), "--device", dev,
           "--json", str(vj)]
    cmd += (["--depth", "2", "--size", "56", "--max-items", "3", "--threads", "1"] if r
            else ["--depth", "32", "--fps", "2", "--size", "448"])
    steps.append(Step("vit_cache", "vit_cache.py (whole 32-block encoder, bf16, eager)", cmd, 0,
                      parse=lambda: _read_json(vj)))

    fj = work / "prefill.json"
    cmd = [py, str(BENCH / "prefill_pruning.py"), "--video", first, "--device", dev, "--dtype", "bfloat16",
           "--keep-ratio", "0.1", "0.25", "--margin", str(ACCEPT_PREFILL_MARGIN), "--json-file", str(fj)]
    cmd += (["--num-layers", "1", "--vision-depth", "1", "--vocab-size", "1024", "--hidden", "512",
             "--min-pixels", str(56 * 56), "--size", "56", "--fps", "1",
             "--seconds", "8", "--warmup", "1", "--ask", "1", "--threads", "1"] if r
            else ["--num-layers", "28", "--vision-depth", "32", "--size", "448", "--fps", "2", "--seconds", "60",
                  "--warmup", "2", "--ask", "3"])
    steps.append(Step("prefill", "prefill_pruning.py (whole 7B, bf16, dense vs keep 0.1/0.25 vs thresholds)", cmd, 0,
                      parse=lambda: _read_json(fj)))

    lj, lp = work / "long_stream_memory.json", work / "long_stream_memory.png"
    cmd = [py, str(BENCH / "long_stream_memory.py"), "--device", dev, "--json", str(lj), "--plot", str(lp)]
    cmd += (["--minutes", "2", "--every", "30", "--window", "30", "--size", "56", "--loop", "8", "--num-layers", "1",
             "--vision-depth", "1", "--threads", "1"] if r
            else ["--dtype", "bfloat16", "--minutes", "30", "--every", "60", "--window", "60", "--size", "224",
                  "--num-layers", "28", "--hidden", "0", "--vision-depth", "2"])
    steps.append(Step("long_stream", "long_stream_memory.py (memory_allocated and peaks)", cmd, 0,
                      parse=lambda: _read_json(lj), files=[(lp, "long_stream_memory.png")]))

    bdir = work / "bench"
    cmd = [py, "-m", "streampress.cli", "bench", first, "--out", str(bdir), "--quiet", "--device", dev]
    cmd += (["--model", "random:qwen2.5-vl-tiny", "--dtype", "float32", "--frames", "4", "--size", "56",
             "--repeats", "1", "--method", "streaming_assistant"] if r
            else ["--model", "random:qwen2.5-vl-7b", "--dtype", "bfloat16", "--frames", "16", "--fps", "2",
                  "--size", "448", "--repeats", "3"])
    steps.append(Step("bench", "streampress bench (random:qwen2.5-vl-7b, cuda, bfloat16)", cmd, 0,
                      parse=lambda: {**_read_json(bdir / "bench.json"), "markdown": (bdir / "bench.md").read_text()},
                      files=[(bdir / "bench.png", "bench.png")]))

    for s in steps:
        s.budget = REHEARSE_BUDGET if r else GPU_BUDGET[s.name]
    return steps


def preimport() -> None:
    """Import what the steps import, once, before ``--fork`` forks them (CPU only)."""
    _src_on_path()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401

    import streampress.bench.runner  # noqa: F401
    import streampress.cli  # noqa: F401
    import streampress.models.qwen  # noqa: F401
    import streampress.session  # noqa: F401
    import streampress.video  # noqa: F401


def _child(cmd: list[str], env: dict, log: Path, ok: type | None = None) -> None:
    """In a forked child: run ``cmd`` (``python SCRIPT ...`` or ``python -m MODULE ...``) here;
    an exception of type ``ok`` means success."""
    import runpy
    import traceback

    code = 1
    try:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(ROOT)
        argv = cmd[1:]
        try:
            if argv[0] == "-m" and argv[1] == "pytest":
                import pytest

                code = pytest.main(argv[2:])
            elif argv[0] == "-m":
                sys.argv = [argv[1]] + argv[2:]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                code = 0
            else:
                sys.argv = argv
                sys.path.insert(0, str(Path(argv[0]).parent))
                runpy.run_path(argv[0], run_name="__main__")
                code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException as exc:
            if ok is not None and isinstance(exc, ok):
                code = 0
            else:
                traceback.print_exc()
                code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(int(code) & 0xFF)


class _ArgsParsed(BaseException):
    """Raised by the patched parser once the arguments parsed (a BaseException, so that no
    ``except Exception`` of a command swallows it)."""


def _check_child(cmd: list[str], env: dict, log: Path) -> None:
    """In a forked child: parse ``cmd``'s arguments with its own parser, run nothing (exit 0
    when they parse, 2 on an argument error); pytest: collect only."""
    import argparse

    if cmd[1:3] == ["-m", "pytest"]:  # pytest parses with argparse itself: let it, and collect only
        _child(cmd + ["--collect-only", "-q"], env, log)
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = original(self, args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        raise _ArgsParsed()

    argparse.ArgumentParser.parse_known_args = parse_known_args
    _child(cmd, env, log, ok=_ArgsParsed)


def check_gpu_args(clips: list[Path], work: Path, env: dict) -> dict:
    """Every GPU-run command's arguments through its own parser, in forked children."""
    results = {}
    for step in build_steps(False, clips, work / "check"):
        log = work / f"check_{step.name}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _check_child(step.cmd, {**env, **step.env}, log)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        text = log.read_text(errors="replace") if log.exists() else ""
        results[step.name] = {"ok": rc == 0, "rc": rc, "log_tail": "" if rc == 0 else text[-LOG_TAIL:]}
    return results


def fork_step(step: Step, env: dict, timeout: float, log: Path) -> tuple[int | None, bool, float]:
    """``run_step`` through ``os.fork`` of this process (its imports already done)."""
    t0 = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(step.cmd, {**env, **step.env}, log)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None, True, time.perf_counter() - t0
        time.sleep(0.05)


def run_step(step: Step, env: dict, timeout: float, log: Path) -> tuple[int | None, bool, float]:
    """Run ``step.cmd`` in its own process group; (exit code or None, timed out, seconds)."""
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env={**env, **step.env}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            return rc, False, time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and whatever it started
            except ProcessLookupError:
                pass
            proc.wait()
            return None, True, time.perf_counter() - t0


# ---------------------------------------------------------------------------- report
def acceptance(steps: dict) -> list[dict]:
    """The issue's acceptance checks, from the parsed results (GPU run)."""
    checks = []
    pr = steps.get("pruning", {}).get("result") or {}
    for method in ("streaming_assistant", "stc"):
        rows = [x for x in pr.get("results", []) if x["method"] == method and not x["params"]
                and x["shape"] == [16, 16, 3584] and x["dtype"] == "bfloat16" and x["device"].startswith("cuda")]
        fast = [x for x in pr.get("fast_paths", []) if x["method"] == method and x["shape"] == [16, 16, 3584]
                and x["dtype"] == "bfloat16" and x.get("masks_match_eager") and "median_ms" in x]
        best = min([(x["median_ms"], "eager") for x in rows] + [(x["median_ms"], x["path"]) for x in fast],
                   default=None)
        checks.append({"check": f"{method}: per-frame call, 16x16x3584 bf16, best path <= {ACCEPT_PRUNING_MS} ms",
                       "value": None if best is None else f"{best[0]:.4f} ms ({best[1]})",
                       "pass": None if best is None else best[0] <= ACCEPT_PRUNING_MS})
    vr = steps.get("vit_cache", {}).get("result") or {}
    ratio = vr.get("meta", {}).get("ratio_total")
    checks.append({"check": f"STC-Cacher / dense encoder time (eager, all clips) <= {ACCEPT_VIT_RATIO}",
                   "value": None if ratio is None else f"{ratio:.3f}",
                   "pass": None if ratio is None else ratio <= ACCEPT_VIT_RATIO})
    fr = steps.get("prefill", {}).get("result") or {}
    for s in fr.get("sessions", []):
        if s["session"] == "dense":
            continue
        limit = s["kept_fraction"] + ACCEPT_PREFILL_MARGIN
        checks.append({"check": f"prefill {s['session']}: ratio <= kept fraction + {ACCEPT_PREFILL_MARGIN}",
                       "value": f"{s['ratio']:.3f} (limit {limit:.3f})", "pass": s["ratio"] <= limit})
    return checks


def _fmt_ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def step_summary(name: str, result: dict) -> list[str]:
    """A few Markdown lines of a step's parsed result."""
    lines = []
    if name == "pytest":
        lines.append(f"passed {result['passed']}, failed {result['failed']}, errors {result['errors']}, "
                     f"skipped {result['skipped']}; pruner positions differing (all ties) "
                     f"{result['pruner_differing_positions_total']}; largest session logits error "
                     f"{result['session_logits_rel_err_max']}")
        lines += [f"- FAILED {c['test']}: {c.get('message', '')[:300]}" for c in result["tests"]
                  if c["status"] in ("failed", "errors")]
    elif name == "pruning":
        lines += ["| method | device / dtype | shape | path | median ms | p10-p90 | masks match eager |",
                  "|---|---|---|---|---:|---|---|"]
        for x in result.get("results", []):
            label = x["method"] + ("".join(f" {k}={v}" for k, v in x["params"].items()))
            lines.append(f"| {label} | {x['device']} / {x['dtype']} | {'x'.join(map(str, x['shape']))} | eager "
                         f"| {x['median_ms']:.3f} | {x['p10_ms']:.3f}-{x['p90_ms']:.3f} | - |")
        for x in result.get("fast_paths", []):
            if "median_ms" in x:
                lines.append(f"| {x['method']} | {x['device']} / {x['dtype']} | {'x'.join(map(str, x['shape']))} "
                             f"| {x['path']} | {x['median_ms']:.3f} | {x['p10_ms']:.3f}-{x['p90_ms']:.3f} "
                             f"| {'yes' if x['masks_match_eager'] else 'NO'} ({x['mask_mismatches']}) |")
            else:
                lines.append(f"| {x['method']} | {x['device']} / {x['dtype']} | {'x'.join(map(str, x['shape']))} "
                             f"| {x['path']} | - | skipped: {x['skipped']} | - |")
    elif name == "vit_cache":
        m = result.get("meta", {})
        lines.append(f"{m.get('device')}, depth {m.get('depth')}, {m.get('dtype')}, {m.get('size')}px, "
                     f"{m.get('fps')} fps: cached / dense (all clips) = {m.get('ratio_total', float('nan')):.3f}")
        lines += ["| clip | items (refs) | dense ms/frame | cached ms/frame | ratio (clip) | ratio (steady) "
                  "| cos mean |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for c in result.get("clips", []):
            lines.append(f"| {c['clip']} | {c['items']} ({c['references']}) | {1e3 * c['dense_s'] / c['frames']:.1f} "
                         f"| {1e3 * c['cached_s'] / c['frames']:.1f} | {c['ratio_clip']:.3f} "
                         f"| {_fmt_ms(c['ratio_steady'])} | {c['cos_mean']:.4f} |")
    elif name == "prefill":
        lines.append(f"{result.get('device')}, {result.get('llm_layers')} LLM layers, {result.get('vision_blocks')} "
                     f"vision blocks, {result.get('dtype')}, {result.get('video')}, "
                     f"{result.get('temporal_patches')} temporal patches; criterion {result.get('criterion')}")
        lines += ["| session | kept fraction | prefill ms / temporal patch | ratio | criterion | first token ms |",
                  "|---|---:|---:|---:|---|---:|"]
        for s in result.get("sessions", []):
            crit = "-" if s["passes"] is None else ("pass" if s["passes"] else "FAIL")
            lines.append(f"| {s['session']} | {s['kept_fraction']:.3f} | {s['prefill_ms_median']:.2f} "
                         f"| {s['ratio']:.3f} | {crit} | {_fmt_ms(s.get('ttft_ms_median'))} |")
    elif name == "long_stream":
        c = result.get("config", {})
        lines.append(f"{c.get('model')}, {c.get('llm_layers')} layers, {c.get('device')}, {c.get('dtype')}, "
                     f"{c.get('minutes')} min at {c.get('fps')} fps, model on device "
                     f"{c.get('model_device_mib', '-')} MiB")
        lines += ["| policy | final device MiB | peak device MiB | answer peak MiB | growth MiB/min | CPU MiB "
                  "| answer s |", "|---|---:|---:|---:|---:|---:|---:|"]
        for s in result.get("summary", []):
            peak = s.get("peak_device_mib")
            ans = s.get("answer_peak_device_mib")
            lines.append(f"| {s['policy']} | {s['final_device_mib']:.1f} | {'-' if peak is None else f'{peak:.1f}'} "
                         f"| {'-' if ans is None else f'{ans:.1f}'} | {s['device_growth_mib_per_min']:.2f} "
                         f"| {s['final_cpu_mib']:.1f} | {s['answer_seconds']:.3f} |")
    elif name == "bench":
        cfg = result.get("config", {})
        lines.append(f"model {cfg.get('model')}, device {cfg.get('device')}, dtype {cfg.get('dtype')}, "
                     f"video {cfg.get('video')}")
        lines += ["", result.get("markdown", "(bench.md missing)")]
    return lines


def write_report(out: Path, report: dict) -> str:
    """Write suite.json and suite.md; return the summary part (status and acceptance tables)."""
    (out / "suite.json").write_text(json.dumps(report, indent=2, default=str))
    env = report["environment"]
    lines = [f"# GPU suite{' (CPU rehearsal)' if report['rehearse'] else ''}", "",
             f"- device: {env.get('device', 'cpu')} (driver {env.get('driver', '-')}, "
             f"capability {env.get('capability', '-')}), CPU {env.get('cpu')} x{env.get('cpu_count')}",
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), transformers {env.get('transformers')}, "
             f"av {env.get('av')}, python {env.get('python')}",
             f"- clips: {', '.join(report['clips'])}" + (" (synthetic)" if report["synthetic_clips"] else ""),
             f"- started {report['started']}, {report.get('seconds', 0):.0f} s so far, deadline {report['deadline']} s",
             "", "| step | status | seconds | budget s | note |", "|---|---|---:|---:|---|"]
    for name in STEP_NAMES:
        s = report["steps"].get(name)
        if s is None:
            continue
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} | {s.get('timeout_s', '-')} "
                     f"| {s.get('reason', '')} |")
    if not report["rehearse"]:
        lines += ["", "## Acceptance (issue 17)", "", "| check | value | result |", "|---|---|---|"]
        for c in acceptance(report["steps"]):
            res = "-" if c["pass"] is None else ("pass" if c["pass"] else "FAIL")
            lines.append(f"| {c['check']} | {c['value'] or '-'} | {res} |")
    head = list(lines)
    for name in STEP_NAMES:
        s = report["steps"].get(name)
        if s is None:
            continue
        lines += ["", f"## {name}: {s['title']} ({s['status']})", "", "`" + " ".join(s["command"]) + "`", ""]
        if s.get("result"):
            try:
                lines += step_summary(name, s["result"])
            except Exception as exc:  # a summary must never lose the JSON
                lines.append(f"(summary failed: {type(exc).__name__}: {exc})")
        if s["status"] != "ok" and s.get("log_tail"):
            lines += ["", "```", s["log_tail"][-1500:], "```"]
    (out / "suite.md").write_text("\n".join(lines) + "\n")
    return "\n".join(head) + "\n"


# ------------------------------------------------------------------------------ main
def prepare(source: Path) -> int:
    """Copy the clips into the ignored folder ``.gpu-clips`` (it then travels with ``carry``)."""
    clips = find_clips(source)
    if not clips:
        print(f"no video files in {source}", file=sys.stderr)
        return 1
    PREPARED_CLIPS.mkdir(exist_ok=True)
    for c in clips:
        shutil.copy2(c, PREPARED_CLIPS / c.name)
    size = sum(c.stat().st_size for c in clips) / 2**20
    print(f"copied {len(clips)} clips ({size:.1f} MiB) into {PREPARED_CLIPS}")
    if not _ignored(PREPARED_CLIPS):
        print(f"note: {PREPARED_CLIPS.name}/ is not ignored by git; add it to .git/info/exclude", file=sys.stderr)
    return 0


def _ignored(path: Path) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else ./gpu-suite-out)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--clips", type=Path, default=None, help="folder of video clips (default: synthetic clips)")
    p.add_argument("--rehearse", action="store_true", help="CPU rehearsal at tiny sizes")
    p.add_argument("--fork", action="store_true",
                   help="rehearsal only: import torch and transformers once, then fork each step from this process "
                        "(same commands, run through runpy; saves the imports of every step on a slow CPU)")
    p.add_argument("--steps", default=",".join(STEP_NAMES),
                   help=f"steps to run, by name or number 1-6 (default all: {','.join(STEP_NAMES)})")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds for the whole suite (default {DEFAULT_DEADLINE}; rehearsal 600)")
    p.add_argument("--prepare", nargs="?", const=DEFAULT_CLIPS_SOURCE, type=Path, default=None, metavar="FOLDER",
                   help=f"copy the clips of FOLDER (default {DEFAULT_CLIPS_SOURCE}) into {PREPARED_CLIPS.name}/ "
                        "and exit")
    args = p.parse_args(argv)
    if args.prepare is not None:
        return prepare(args.prepare)
    if args.fork and not args.rehearse:
        p.error("--fork is for the CPU rehearsal only (CUDA does not survive a fork)")

    wanted = []
    for item in filter(None, (s.strip() for s in args.steps.split(","))):
        name = STEP_NAMES[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(STEP_NAMES) else item
        if name not in STEP_NAMES:
            p.error(f"--steps: unknown step {item!r} (one of {', '.join(STEP_NAMES)} or 1-{len(STEP_NAMES)})")
        wanted.append(name)
    out = args.out or Path(os.environ.get("OUT") or "gpu-suite-out")
    out = out if out.is_absolute() else Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    work = work if work.is_absolute() else Path.cwd() / work
    work.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline or (600.0 if args.rehearse else float(DEFAULT_DEADLINE))
    t_start = time.perf_counter()

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("HF_HUB_OFFLINE", "1")  # random models only: never wait for a hub
    if args.fork:
        preimport()
    info = environment(env, in_process=args.fork)
    if not args.rehearse and not info.get("cuda_available"):
        print("gpu_suite: CUDA is not available: the GPU steps will fail (use --rehearse on a CPU)", file=sys.stderr)

    notes = []
    clips = [c.resolve() for c in find_clips(args.clips)]
    if args.clips is not None and not clips:
        notes.append(f"no video files in {args.clips}: synthetic clips used")
    if clips and str(info.get("av", "")).startswith("missing"):
        notes.append("PyAV is missing: the clips cannot be decoded, synthetic clips used")
        clips = []
    synthetic = not clips
    if synthetic:
        clips = synthetic_clips(work, 1 if args.rehearse else 3, 8 if args.rehearse else 20,
                                112 if args.rehearse else 448)
    for n in notes:
        print(f"gpu_suite: {n}", file=sys.stderr)

    report = {"suite": "benchmarks/gpu_suite.py", "rehearse": args.rehearse,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "deadline": deadline, "environment": info, "clips": [c.name for c in clips],
              "synthetic_clips": synthetic, "notes": notes, "work": str(work), "steps": {}}
    suite_log = out / "suite.log"
    suite_log.write_text("")
    steps = build_steps(args.rehearse, clips, work)
    launch = run_step
    if args.fork:
        launch = fork_step
        report["gpu_args_check"] = check_gpu_args(clips, work, env)
        bad = [k for k, v in report["gpu_args_check"].items() if not v["ok"]]
        print(f"gpu_suite: GPU-run arguments parse: {'all steps' if not bad else 'FAILED for ' + ', '.join(bad)}",
              file=sys.stderr)
    for step in steps:
        rec = {"title": step.title, "command": [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                                                for c in step.cmd],
               "env": step.env, "budget_s": step.budget}
        report["steps"][step.name] = rec
        left = deadline - (time.perf_counter() - t_start)
        if step.name not in wanted:
            rec.update(status="skipped", reason="not in --steps")
        elif left < MIN_STEP_SECONDS:
            rec.update(status="skipped", reason=f"global deadline ({left:.0f} s left)")
        else:
            timeout = min(step.budget, left - 5)
            rec["timeout_s"] = round(timeout)
            rec["device_before"] = nvidia_smi()
            print(f"gpu_suite: [{step.name}] {' '.join(rec['command'])} (timeout {timeout:.0f} s)", file=sys.stderr,
                  flush=True)
            log = work / f"{step.name}.log"
            rc, timed_out, seconds = launch(step, env, timeout, log)
            text = log.read_text(errors="replace")
            with open(suite_log, "a") as f:
                f.write(f"===== {step.name}: {' '.join(rec['command'])}\n{text[-200_000:]}\n")
            rec.update(rc=rc, timed_out=timed_out, seconds=round(seconds, 2), log_tail=text[-LOG_TAIL:],
                       device_after=nvidia_smi())
            try:
                rec["result"] = step.parse()
            except Exception as exc:  # a partial JSON (pruning writes as it goes) or none
                rec["parse_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            for src, name in step.files:
                if Path(src).is_file():
                    shutil.copy2(src, out / name)
            if timed_out:
                rec.update(status="timeout", reason=f"ran past {timeout:.0f} s")
            elif rc != 0:
                rec.update(status="failed", reason=f"exit code {rc}: " + (text.strip().splitlines() or [""])[-1][:200])
            elif "parse_error" in rec:
                rec.update(status="failed", reason=f"no result: {rec['parse_error']}")
            else:
                rec.update(status="ok", reason="")
                if step.name == "pytest":
                    res = rec["result"]
                    rec["reason"] = f"{res['passed']} passed, {res['skipped']} skipped" + (
                        " (nothing ran: no CUDA?)" if not res["passed"] else "")
            print(f"gpu_suite: [{step.name}] {rec['status']} in {seconds:.1f} s {rec['reason']}", file=sys.stderr,
                  flush=True)
        report["seconds"] = time.perf_counter() - t_start
        write_report(out, report)

    report["seconds"] = time.perf_counter() - t_start
    summary = write_report(out, report)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(summary + f"\nFull report: {out / 'suite.md'}, {out / 'suite.json'}; logs: {suite_log}")
    ran = [s for s in report["steps"].values() if s["status"] != "skipped" or s["reason"] != "not in --steps"]
    return 0 if all(s["status"] == "ok" for s in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
