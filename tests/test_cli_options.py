"""The command line's options, parsed in process: one spelling across run/bench/eval, one-line
argument errors, question times and files, the VIDEO argument, and the package layout."""

from __future__ import annotations

import ast
import json
import math
import time
from pathlib import Path

import pytest

from streampress.cli import main, parse_args
from streampress.cli.model import resolve_model
from streampress.cli.options import Synthetic, aspect_note, memory, memory_policy, memory_text, video
from streampress.cli.run import Question, parse_question, parse_time, read_questions, stream_answers

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = "random:qwen2.5-vl-tiny"


@pytest.fixture
def files(tmp_path):
    """A placeholder video path (parsing does not open it) and an annotation file for eval."""
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "ann.json").write_text("[]")
    return tmp_path


def base_args(command: str, files: Path) -> list[str]:
    return {"run": ["run", str(files / "clip.mp4"), "--model", TINY],
            "bench": ["bench", "--model", TINY],
            "eval": ["eval", "ovobench", "--annotations", str(files / "ann.json"), "--model", TINY]}[command]


def error_of(capsys, argv: list[str]) -> str:
    """The one stderr line of an argument error (exit status 2)."""
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and not captured.out, (rc, captured)
    assert "usage:" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- one spelling
# (option values, the settings they give on the namespace) — the same in every command
SHARED = [
    (["--method", "stc", "--keep-ratio", "0.5"], {"keep_ratio": 0.5}),
    (["--method", "dtd", "--param", "tau=0.7"], {"params": {"tau": 0.7}, "keep_ratio": None}),
    (["--method", "dense"], {"method": "none"}),
    (["--cacher", "--cacher-rho", "0.5", "--cacher-interval", "3"], {"cacher": {"rho": 0.5, "interval": 3}}),
    (["--cacher", "--cacher-refresh-threshold", "0.9"],
     {"cacher": {"rho": 0.25, "interval": 2, "refresh_threshold": 0.9}}),
    (["--fps", "2.5", "--size", "320x240"], {"fps": 2.5, "size": (320, 240)}),
    (["--size", "448"], {"size": 448}),
    (["--device", "cpu", "--dtype", "bfloat16"], {"device": "cpu", "dtype": "bfloat16"}),
    (["--max-new-tokens", "5"], {"max_new_tokens": 5}),
    (["--model", "random:qwen3-vl-tiny"], {"model": "random:qwen3-vl-tiny"}),
]
MEMORY = [  # run and eval (bench measures the full cache only)
    (["--memory", "full"], {"memory": None}),
    (["--memory", "window:30"], {"memory": {"name": "window", "seconds": 30.0}}),
    (["--memory", "retrieval:window=4,top_k=2"],
     {"memory": {"name": "retrieval", "window_seconds": 4.0, "top_k": 2, "block_items": 1}}),
]


def each_command(cases: list, memory_cases: list) -> list:
    """(command, *case) for run, bench and eval: every case in each of them."""
    return [(c, *case) for c in ("run", "bench", "eval") for case in cases + memory_cases]


@pytest.mark.parametrize("command,argv,expected", each_command(SHARED, MEMORY))
def test_every_option_is_read_the_same_way_by_each_command(files, command, argv, expected):
    args = parse_args(base_args(command, files) + argv)
    for key, value in expected.items():
        got = getattr(args, key)
        if key == "method" and command == "bench":
            got = got[0] if got else "none"  # bench takes a list: "dense" leaves the baseline only
        assert got == value, (command, key)


def test_method_lists_and_defaults(files):
    assert parse_args(["bench", "--method", "stc,random"]).method == ("stc", "random")
    bench = parse_args(["bench"])
    from streampress.bench.runner import DEFAULT_FRAMES, DEFAULT_METHODS

    assert bench.method == DEFAULT_METHODS and bench.keep_ratio == 0.25 and bench.frames == DEFAULT_FRAMES
    assert parse_args(["bench", "--method", "dtd", "--param", "tau=0.5"]).keep_ratio is None  # own rule
    run = parse_args(base_args("run", files))
    assert (run.method, run.keep_ratio, run.cacher, run.memory, run.max_new_tokens) == ("none", None, None, None, 32)
    assert parse_args(base_args("eval", files)).max_new_tokens == 16


def test_help_shows_the_real_defaults(capsys):
    from streampress.bench.runner import DEFAULT_FRAMES, DEFAULT_MODEL, DEFAULT_SIZE

    def help_of(command):
        assert main([command, "--help"]) == 0
        return " ".join(capsys.readouterr().out.split())

    bench = help_of("bench")
    assert f"frames to stream (default {DEFAULT_FRAMES})" in bench and DEFAULT_MODEL in bench
    assert f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]} for the synthetic clip" in bench
    assert "longest answer in tokens (default 8)" in bench
    run = help_of("run")
    assert "longest answer in tokens (default 32)" in run and "synthetic[:SECONDS]" in run
    assert "camera index (0)" in run and "HH:MM:SS or end" in run
    assert "longest answer in tokens (default 16)" in help_of("eval")


# ---------------------------------------------------------------------------- one-line errors
BAD = [  # (option values, text the error line must contain)
    (["--keep-ratio", "5"], "argument --keep-ratio: expected a number in (0, 1], got '5'"),
    (["--keep-ratio", "0"], "got '0'"),
    (["--method", "nope"], "unknown pruning method 'nope'"),
    (["--method", "full"], "no pruning is spelled 'none'"),
    (["--method", "dtd", "--param", "tau"], "expected KEY=VALUE, got 'tau'"),
    (["--method", "dtd", "--param", "foo=1"], "unknown parameter(s) foo"),
    (["--method", "none", "--keep-ratio", "0.5"], "need a --method"),
    (["--cacher-rho", "2", "--cacher"], "argument --cacher-rho: expected a number in (0, 1], got '2'"),
    (["--cacher-interval", "0", "--cacher"], "got '0'"),
    (["--fps", "inf"], "argument --fps: expected a finite number > 0, got 'inf'"),
    (["--size", "0x4"], "got '0x4'"),
    (["--size", "big"], "got 'big'"),
    (["--dtype", "float8"], "argument --dtype: expected float32, bfloat16 or float16, got 'float8'"),
    (["--device", "gpu"], "got 'gpu'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got '0'"),
    (["--model", "not a model"], "'not a model' is no checkpoint folder, random:ARCH"),
    (["--model", "random:nope"], "unknown random architecture 'random:nope'"),
    (["--rho", "0.5"], "--rho is spelled --cacher-rho RHO now"),
    (["--interval", "3"], "--interval is spelled --cacher-interval N now"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]
BAD_MEMORY = [
    (["--memory", "window:-3"], "'window:-3'"),
    (["--memory", "retrieval:window=4"], "window= and top_k= are required"),
    (["--memory", "retrieval:window=4,top_k=-1"], "top_k must be an integer >= 0"),
    (["--memory", "lru"], "unknown memory policy in 'lru'"),
    (["--window", "30"], "--window is spelled --memory window:SECONDS now"),
]


@pytest.mark.parametrize("command,argv,needle", each_command(BAD, BAD_MEMORY))
def test_bad_values_give_one_line_naming_them(files, capsys, command, argv, needle):
    line = error_of(capsys, base_args(command, files) + argv)
    assert line.startswith(f"streampress {command}: error: ") and needle in line, line
    assert line.endswith(f"see 'streampress {command} --help'")


def test_command_specific_errors(files, capsys):
    assert "--methods is spelled --method A,B,C now" in error_of(capsys, ["bench", "--methods", "stc"])
    assert "--options must follow" in error_of(capsys, base_args("run", files) + ["--options", "a;b"])
    assert "at least two choices" in error_of(capsys, base_args("run", files) + ["--ask", "1: Q?", "--options", "a"])
    assert "--model is required" in error_of(capsys, ["eval", "ovobench", "--annotations", "a.json"])
    assert "required: VIDEO, --model" in error_of(capsys, ["run"])
    assert "invalid choice: 'bogus'" in error_of(capsys, ["bogus"])
    assert "--cacher-rho applies with --cacher" in error_of(capsys, base_args("run", files) + ["--cacher-rho", ".5"])
    assert "random: architectures only" in error_of(
        capsys, ["run", str(files / "clip.mp4"), "--model", str(files), "--num-layers", "1"])


def test_an_implausible_model_name_is_refused_at_once(files, capsys):
    for name in ("gpt4", "a/b/c", "./missing/folder", "owner/na me", "org--x/y"):
        started = time.perf_counter()
        line = error_of(capsys, base_args("run", files) + ["--model", name])
        assert "argument --model" in line and repr(name) in line and time.perf_counter() - started < 2
    assert parse_args(base_args("run", files) + ["--model", "Qwen/Qwen2.5-VL-7B-Instruct"]).model
    assert parse_args(base_args("run", files) + ["--model", str(files)]).model == str(files)  # a folder


def test_hub_id_without_network_is_one_line_naming_a_local_folder(tmp_path, monkeypatch):
    hub_id = "streampress-tests/never-cached"
    assert resolve_model(hub_id, reachable=lambda: True) == hub_id
    assert resolve_model(TINY, reachable=lambda: False) == TINY and resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(RuntimeError, match="cannot be reached") as exc:
        resolve_model(hub_id, reachable=lambda: False)
    assert "\n" not in str(exc.value) and "--model DIR" in str(exc.value)


# ---------------------------------------------------------------------------- values
def test_question_times():
    assert parse_time("12.5") == 12.5 and parse_time("1:05") == 65 and parse_time("0:01:02.5") == 62.5
    assert parse_time("90:00") == 5400 and parse_time("end") == math.inf
    for bad in ("1:75", "1:60:00", "1:2:3:4", "1.5:30", "-3", "soon", ""):
        with pytest.raises(ValueError, match="SECONDS, MM:SS"):
            parse_time(bad)
    assert parse_question("12.5: What is on the table?") == Question(12.5, "What is on the table?")
    assert parse_question("1:05: what: exactly?") == Question(65.0, "what: exactly?")
    assert parse_question("end: Summary?").time == math.inf
    import argparse

    for bad, needle in (("What?", "expected 'TIME: question'"), ("1:75: Q?", "'1:75' is no time")):
        with pytest.raises(argparse.ArgumentTypeError, match=needle) as exc:
            parse_question(bad)
        assert "SECONDS, MM:SS (seconds below 60), HH:MM:SS or end" in str(exc.value)


def test_questions_file_json_and_jsonl(tmp_path, capsys):
    entries = [{"time": 3, "question": "Which colour?", "options": ["red", "green"]},
               {"time": "1:05", "question": "What moves?"}, {"time": "end", "question": "Summary?"}]
    expected = [Question(3.0, "Which colour?", ["red", "green"]), Question(65.0, "What moves?"),
                Question(math.inf, "Summary?")]
    (tmp_path / "q.json").write_text(json.dumps(entries))
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    assert read_questions(str(tmp_path / "q.json")) == read_questions(str(tmp_path / "q.jsonl")) == expected
    # merged with --ask and sorted by time ("end" last)
    args = parse_args(["run", "synthetic", "--model", TINY, "--questions", str(tmp_path / "q.jsonl"),
                       "--ask", "2: Now?"])
    assert [q.time for q in args.questions] == [2.0, 3.0, 65.0, math.inf]
    bad = {"bad.jsonl": ('{"time": 1, "question": "a"}\n{"time": "1:75", "question": "b"}',
                         "bad.jsonl line 2: field 'time'"),
           "nq.json": ('[{"time": 1}]', "nq.json entry 0: field 'question': missing"),
           "opt.json": ('[{"time": 1, "question": "q", "options": ["one"]}]', "field 'options'"),
           "neg.json": ('[{"time": -1, "question": "q"}]', "seconds >= 0"),
           "broken.jsonl": ('{"time": 1,', "broken.jsonl line 1: not valid JSON"),
           "empty.jsonl": ("", "no questions")}
    for name, (text, needle) in bad.items():
        (tmp_path / name).write_text(text)
        line = error_of(capsys, ["run", "synthetic", "--model", TINY, "--questions", str(tmp_path / name)])
        assert line.startswith("streampress run: error: argument --questions: ") and needle in line, line
    assert "missing.json: cannot read it" in error_of(
        capsys, ["run", "synthetic", "--model", TINY, "--questions", str(tmp_path / "missing.json")])


def test_video_argument_camera_index_and_synthetic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert video("0") == 0 and video("12") == 12  # camera indexes, as --help promises
    assert video("synthetic") == Synthetic() and video("synthetic:4") == Synthetic(4.0)
    assert video("rtsp://cam/1") == "rtsp://cam/1" and video("clip.mp4") == "clip.mp4"
    (tmp_path / "0").mkdir()  # an existing path wins
    assert video("0") == "0"


def test_run_0_opens_camera_0(monkeypatch, capsys):
    import streampress.video

    opened = []

    def fake_open(source, **kw):
        opened.append(source)
        raise streampress.video.VideoError(f"camera {source}: test stops here")

    monkeypatch.setattr(streampress.video, "open_video", fake_open)
    assert main(["run", "0", "--model", TINY, "--ask", "1: Q?", "-q"]) == 1
    assert opened == [0] and "camera 0: test stops here" in capsys.readouterr().err


def test_memory_specs_build_their_policies():
    from streampress import RetrievalMemory, SlidingWindow

    spec = memory("retrieval:window=4,top_k=2,block_items=3")
    assert memory_policy(spec) == RetrievalMemory(window_seconds=4, top_k=2, block_items=3)
    assert memory_policy(memory("window:30")) == SlidingWindow(seconds=30) and memory_policy(None) == "full"
    for text in ("full", "window:30", "retrieval:window=4,top_k=2,block_items=3"):
        assert memory_text(memory(text)) == text


def test_aspect_note():
    assert aspect_note((448, 448), 640, 480) and "640x480" in aspect_note((448, 448), 640, 480)
    assert aspect_note((320, 240), 640, 480) is None and aspect_note(448, 640, 480) is None


class _Frame:
    def __init__(self, t):
        import numpy as np

        self.image, self.timestamp = np.zeros((8, 8, 3), np.uint8), t


class _Session:
    def __init__(self):
        self.frames = 0

    def add_frames(self, frames, times):
        self.frames += len(frames)

    def ask(self, text, max_new_tokens, options=None):
        return f"{self.frames} frames"

    def stats(self):
        return {}


def test_a_question_before_any_frame_warns():
    warnings = []
    questions = [Question(0.5, "early?"), Question(3.0, "later?"), Question(math.inf, "end?")]
    records = list(stream_answers([_Frame(t) for t in (2.0, 3.0, 4.0)], questions, _Session(), 1, 4,
                                  warn=warnings.append))
    assert [r["answer"] for r in records] == ["0 frames", "2 frames", "3 frames"]
    assert len(warnings) == 1 and "0.5 s comes before the first frame" in warnings[0]


# ---------------------------------------------------------------------------- layout
def _imports(path: Path, module: str) -> set[str]:
    """Modules of streampress that ``module`` (file ``path``) imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("streampress")}


def test_cli_package_has_no_import_circles_and_the_library_does_not_import_it():
    modules = {}
    for path in (SRC / "streampress").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    for old in ("streampress.cli_run", "streampress.bench.command", "streampress.eval.cli"):
        assert old not in modules  # no leftover shims
    cli = {m for m in modules if m.startswith("streampress.cli.")}
    assert {"streampress.cli.run", "streampress.cli.bench", "streampress.cli.eval", "streampress.cli.list",
            "streampress.cli.options"} <= cli
    for name, path in modules.items():
        if not name.startswith("streampress.cli") and not name.endswith("__main__"):
            assert not any(m.startswith("streampress.cli") for m in _imports(path, name)), name
    graph = {m: {d for d in _imports(modules[m], m) if d in cli} for m in cli}

    def visit(node, trail):
        assert node not in trail, " -> ".join([*trail, node])
        for dep in graph[node]:
            visit(dep, [*trail, node])

    for module in cli:
        visit(module, [])


def test_runtime_dependencies_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    deps = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    assert {"numpy", "torch", "transformers", "av", "pillow", "rich"} <= names
