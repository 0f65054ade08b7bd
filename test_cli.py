"""Tests of train_shakespeare.py as a user runs it: the command line, its refusals, --resume and
--overwrite, the report, the sample and --use-triton without a GPU.

The end-to-end tests run the script in a subprocess with the environment a user has: without the
TRITON_INTERPRET that conftest.py sets for this process, so that it can never hide a user's failure."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import corpus
import recall_task
import report
import tiny_hybrid
import train_shakespeare as ts

SCRIPT = Path(ts.__file__)
# A model and task small enough for a few CPU seconds per preset.
TINY = ["--steps", "4", "--seq-len", "20", "--dense-len", "10", "--dense-facts", "2", "--drill-facts", "2",
        "--max-facts", "2", "--batch-size", "2", "--window", "8", "--d-model", "16", "--gdn-head-dim", "8",
        "--eval-batch", "1", "--log-every", "2", "--lte-buffer", "4"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small UTF-8 text (Shakespeare's words, ~30k characters) for --data: no corpus conversion."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(corpus.load_corpus(cache_dir=tmp_path_factory.mktemp("cache"))[1][:30_000], encoding="utf-8")
    return path


def run_cli(*flags, timeout=600):
    """The script as a user runs it: a fresh process, no TRITON_INTERPRET in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, flags)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def snapshot(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_refused(proc, *words):
    """Exit status 2, one line on stderr that contains every word, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("train_shakespeare.py: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])


# ----------------------------------------------------------------------------------------------
# end to end: a run, a rerun refused, --resume that adds and extends, --overwrite, --use-triton
# ----------------------------------------------------------------------------------------------


def test_run_then_refuse_then_resume_then_overwrite(tmp_path, text_file):
    out = tmp_path / "out"
    # --jobs 1: one run after the other in this process, with a progress line per --log-every steps
    first = run_cli(*TINY, "--models", "gdn,gdn+lte", "--data", text_file, "--out", out, "--jobs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["gdn", "gdn+lte"] and results["seeds"] == [0]
    assert {"gdn_seed0.pt", "gdn_lte_seed0.pt", "forgetting_gap.png", "training_curves.png"} <= set(snapshot(out))
    # the progress line names LTE's layer, not an "L1" that reads as the penalty
    assert "| layer1 r>0/head" in first.stdout and "| L1 " not in first.stdout
    # one seed: the run says how to add more
    assert "--resume --seeds 0,1,2" in first.stdout
    # after 4 steps recall is at chance, and the report says that this is expected
    assert "is expected after 4 steps" in first.stdout
    # prompt and continuation apart, the continuation written by the model
    sample = results["sample"]
    assert sample["model"] == "gdn+lte" and sample["prompt"] in text_file.read_text(encoding="utf-8")
    assert sample["continuation"].strip() and sample["continuation"] not in text_file.read_text(encoding="utf-8")
    assert f"--- prompt (from the held-out text) ---\n{sample['prompt']}\n--- continuation" in first.stdout
    # the versions that produced it; each model's state in bytes as its decoding state's tensors hold
    # them, and the report says in words how much more state the hybrid carries than pure GDN
    assert results["versions"]["torch"] == torch.__version__
    state = {p: results["models"][p]["summary"]["eval"]["20"]["state_bytes"] for p in ("gdn", "gdn+lte")}
    for preset, nbytes in state.items():
        model = tiny_hybrid.TinyHybrid(cli.model_config(preset, cli.parse_args([*map(str, TINY)]), corpus.VOCAB_SIZE))
        assert nbytes == model.state_nbytes(model.init_state(1, max_len=20))
    assert f"gdn+lte {state['gdn+lte'] / state['gdn']:.1f}x" in first.stdout

    # the same command again would overwrite: refused before any work, nothing touched
    before = snapshot(out)
    again = run_cli(*TINY, "--models", "gdn", "--data", text_file, "--out", out)
    assert_refused(again, str(out), "--resume", "--overwrite")
    assert snapshot(out) == before

    # --resume: gdn is extended from 4 to 6 steps, gdn+swa is new, gdn+lte keeps its results
    resumed = run_cli(*TINY, "--models", "gdn,gdn+swa", "--steps", "6", "--data", text_file, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "gdn seed 0: resumed at step 4" in resumed.stdout and "gdn+swa seed 0: no checkpoint" in resumed.stdout
    assert "not retrained now: gdn+lte seed 0" in resumed.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["gdn", "gdn+lte", "gdn+swa"]
    gdn, lte, swa = (results["models"][p]["runs"]["0"] for p in ("gdn", "gdn+lte", "gdn+swa"))
    assert (gdn["steps"], gdn["schedule_steps"]) == (6, 4) and "not the same as a fresh 6-step run" in gdn["extended"]
    assert (lte["steps"], lte["schedule_steps"]) == (4, 4) and "extended" not in lte
    assert (swa["steps"], swa["schedule_steps"]) == (6, 6) and "extended" not in swa
    assert [h["step"] for h in gdn["history"]] == [2, 4, 6]
    assert torch.load(out / "gdn_seed0.pt", weights_only=True)["step"] == 6

    # --overwrite starts afresh: this script's files go, a user's own file stays
    (out / "notes.txt").write_text("mine")
    fresh = run_cli(*TINY, "--models", "gdn", "--data", text_file, "--out", out, "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert list(json.loads((out / "results.json").read_text())["models"]) == ["gdn"]
    assert sorted(snapshot(out)) == ["forgetting_gap.png", "gdn_seed0.pt", "notes.txt", "results.json",
                                     "training_curves.png"]


def assert_summary_matches_the_seeds(model: dict) -> None:
    """Every summary cell of a model in results.json is the mean, min and max of its seeds' numbers."""
    runs, summary = model["runs"], model["summary"]
    assert summary["seeds"] == [int(seed) for seed in runs]
    checked = 0
    for length, cells in summary["eval"].items():
        per_seed = [run["eval"][length]["lm_loss"] for run in runs.values()]
        assert cells["lm_loss"] == {"mean": pytest.approx(np.mean(per_seed)), "min": min(per_seed),
                                    "max": max(per_seed), "n": len(runs)}
        for n, by_bin in cells["recall"].items():
            for cell, stats in by_bin.items():
                per_seed = [run["eval"][length]["recall"][n][cell] for run in runs.values()]
                assert stats == {"mean": pytest.approx(np.mean(per_seed)), "min": min(per_seed),
                                 "max": max(per_seed), "n": len(runs)}
                checked += 1
    assert checked > 10
    assert len({run["eval"]["20"]["lm_loss"] for run in runs.values()}) == len(runs)  # the seeds differ


def test_seeds_give_every_run_and_a_summary_then_resume_adds_a_seed(tmp_path, text_file):
    out = tmp_path / "out"
    flags = [*TINY, "--eval-every", "1", "--models", "gdn", "--data", text_file, "--out", out]
    first = run_cli(*flags, "--seeds", "0,1")
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and list(results["models"]) == ["gdn"]
    model = results["models"]["gdn"]
    assert list(model["runs"]) == ["0", "1"]
    for run in model["runs"].values():
        assert [p["step"] for p in run["probe"]] == [1, 2, 3, 4]               # the held-out curve, every step
        assert set(run["convergence"]) == {"converged", "verdict", "last_quarter_gain"}
        assert run["learned"] is False                                         # 4 steps learn nothing...
    assert model["summary"]["not_learned"] == [0, 1]                           # ...and no seed is dropped for it
    assert_summary_matches_the_seeds(model)
    assert {"gdn_seed0.pt", "gdn_seed1.pt", "forgetting_gap.png", "training_curves.png"} <= set(snapshot(out))
    # the report: mean (min-max) per model and setting, then each seed marked at the hardest setting
    assert "mean (min-max) over the model's seeds" in first.stdout
    loss = model["summary"]["eval"]["20"]["lm_loss"]["mean"]
    assert re.search(rf"^gdn \?!\s+2\s+{loss:.3f}\s", first.stdout, re.M)      # its seeds' marks, 2 seeds
    seed_table = first.stdout[first.stdout.index("per seed, hardest setting"):]
    assert re.search(r"^gdn\s+\S+ \?!\s+\S+ \?!$", seed_table, re.M)      # not judged, not learned
    assert "--resume --seeds" not in first.stdout                              # the hint is for one seed only

    # --resume naming one more seed: seeds 0 and 1 are read back untouched, seed 2 trains
    resumed = run_cli(*flags, "--seeds", "0,1,2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "holds seeds 0, 1; this run adds seed 2" in resumed.stdout
    assert "gdn seed 1: finished earlier" in resumed.stdout and "gdn seed 2: no checkpoint" in resumed.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["seeds"] == [0, 1, 2] and list(again["models"]["gdn"]["runs"]) == ["0", "1", "2"]
    assert again["models"]["gdn"]["runs"]["1"] == model["runs"]["1"]
    assert_summary_matches_the_seeds(again["models"]["gdn"])


def test_parallel_runs_train_as_in_process_and_a_failed_run_is_reported(tmp_path, text_file):
    """--jobs 2 on a CPU (asked for: a GPU machine would train on CUDA): each run in its own process,
    trained as in this process; then a run whose checkpoint cannot be loaded fails with its error
    while the other finishes, and the exit status says so."""
    out = tmp_path / "out"
    flags = [*TINY, "--eval-every", "2", "--models", "gdn", "--seeds", "0,1", "--data", text_file, "--out", out,
             "--jobs", "2", "--device", "cpu"]
    parallel = run_cli(*flags)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert "2 runs, 2 at a time as separate processes on cpu" in parallel.stdout
    assert "started gdn seed 0 on cpu" in parallel.stdout and "finished gdn seed 1:" in parallel.stdout
    assert " step " not in parallel.stdout                 # no progress lines of the children interleaved
    runs = json.loads((out / "results.json").read_text())["models"]["gdn"]["runs"]
    tokens = corpus.tokenize(corpus.load_tokenizer(), corpus.load_corpus(text_file)[0])
    for seed in (0, 1):
        args = cli.parse_args([*map(str, TINY), "--seed", str(seed), "--out", str(tmp_path / "here")])
        here = ts.train_model("gdn", args, tokens, corpus.VOCAB_SIZE, torch.device("cpu"))[1]
        assert [h["loss"] for h in runs[str(seed)]["history"]] == pytest.approx([h["loss"] for h in here["history"]],
                                                                               rel=1e-4)

    # a foreign checkpoint for seed 1 (its weights lack the embedding): that run fails, seed 0 goes on
    ckpt = torch.load(out / "gdn_seed1.pt", weights_only=True)
    del ckpt["model"]["wte.weight"]
    torch.save(ckpt, out / "gdn_seed1.pt")
    broken = run_cli(*flags, "--resume", "--steps", "6")
    assert broken.returncode == 1, broken.stderr[-3000:]
    assert re.search(r"^FAILED gdn seed 1 on cpu: RuntimeError: .*wte\.weight", broken.stdout, re.M)
    assert "finished gdn seed 0:" in broken.stdout
    assert "1 run failed: gdn seed 1 (RuntimeError" in broken.stderr and "Traceback" in broken.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]["gdn"]["runs"]) == ["0"]                  # seed 1's old results are gone too
    assert results["models"]["gdn"]["runs"]["0"]["steps"] == 6
    assert [(f["model"], f["seed"]) for f in results["failed_runs"]] == [("gdn", 1)]
    seed_table = broken.stdout[broken.stdout.index("per seed, hardest setting"):]
    assert re.search(r"^gdn\s+\S+ \S*\s+x$", seed_table, re.M)


def test_ctrl_c_stops_parallel_runs_after_a_saved_step_and_resume_finishes_them(tmp_path, text_file):
    out = tmp_path / "out"
    flags = [*TINY, "--steps", "300", "--checkpoint-every", "5", "--models", "gdn,gdn+swa", "--data", text_file,
             "--out", out, "--jobs", "2"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not all((out / f"{name}_seed0.pt").exists() for name in ("gdn", "gdn_swa")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)          # the parent only: it asks its children to save and stop
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout[-2000:], stderr[-2000:])
    assert "Ctrl-C: every running run saves after its current step" in stdout
    assert re.search(r"interrupted: runs saved: gdn seed 0 at step \d+, gdn\+swa seed 0 at step \d+|"
                     r"interrupted: runs saved: gdn\+swa seed 0 at step \d+, gdn seed 0 at step \d+", stdout), stdout
    steps = {name: torch.load(out / f"{name}_seed0.pt", weights_only=True)["step"] for name in ("gdn", "gdn_swa")}
    assert all(0 < step < 300 for step in steps.values()), steps
    assert not (out / "results.json").exists()
    resumed = run_cli(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, step in steps.items():
        assert f"{name.replace('_', '+')} seed 0: resumed at step {step}" in resumed.stdout
    results = json.loads((out / "results.json").read_text())
    assert [results["models"][p]["runs"]["0"]["history"][-1]["step"] for p in ("gdn", "gdn+swa")] == [300, 300]


def test_use_triton_without_a_gpu_says_what_it_does_and_trains(tmp_path, text_file):
    """On a CPU-only machine --use-triton used to crash (building the optimizer imports Triton before
    kernels.py could switch it to its interpreter). It must say what it will do and how long it takes,
    name the faster choice, then train through the kernels."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --use-triton compiles the kernels instead")
    proc = run_cli(*TINY, "--steps", "2", "--models", "gdn+swa", "--data", text_file, "--out", tmp_path / "out",
                   "--use-triton")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = proc.stdout.index("Triton's CPU interpreter")
    assert "This run: about" in proc.stdout and "Drop --use-triton" in proc.stdout
    assert plan < proc.stdout.index("gdn+swa   seed 0  step")               # said before training
    assert json.loads((tmp_path / "out" / "results.json").read_text())["args"]["use_triton"] is True


def test_a_bad_flag_is_refused_in_a_subprocess_without_a_traceback(tmp_path):
    proc = run_cli("--steps", "0", "--out", tmp_path / "out")
    assert_refused(proc, "--steps 0", ">= 1")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# refusals before any work (in-process main: the same code path, faster)
# ----------------------------------------------------------------------------------------------


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        ts.main(list(map(str, argv)))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], ["--steps 0", ">= 1"]),
    (["--steps", "-5"], ["--steps -5"]),
    (["--seq-len", "7"], ["--seq-len 7", "--max-facts 24", ">= 120"]),
    (["--dense-len", "30"], ["--dense-len 30", "--dense-facts 8", ">= 40"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--eval-batch", "0"], ["--eval-batch 0"]),
    (["--lr", "0"], ["--lr 0", "> 0"]),
    (["--lr", "nan"], ["--lr nan", "finite"]),
    (["--lr", "inf"], ["--lr inf", "finite"]),
    (["--d-model", "0"], ["--d-model 0"]),
    (["--d-model", "12"], ["--d-model 12", "multiple of 8"]),
    (["--n-layer", "0"], ["--n-layer 0"]),
    (["--n-layer", "1"], ["--n-layer 1", "gdn+swa", ">= 2"]),
    (["--gdn-heads", "0"], ["--gdn-heads 0"]),
    (["--gdn-head-dim", "0"], ["--gdn-head-dim 0"]),
    (["--gdn-value-dim", "-1"], ["--gdn-value-dim -1"]),
    (["--window", "2"], ["--window 2", ">= 4"]),
    (["--window", "4", "--models", "gdn+lte"], ["--models gdn+lte", "window (4)", "reach"]),
    (["--nsa-topn", "2", "--models", "gdn+nsa"], ["--models gdn+nsa", "nsa_topn"]),
    (["--key-conv", "-1"], ["--key-conv -1"]),
    (["--lte-buffer", "-1"], ["--lte-buffer -1"]),
    (["--lte-lambda-init", "2"], ["--lte-lambda-init 2.0", "<= 1.0"]),
    (["--lte-lambda-every", "-1"], ["--lte-lambda-every -1"]),
    (["--lte-router-lr", "-0.1"], ["--lte-router-lr -0.1"]),
    (["--answer-weight", "-1"], ["--answer-weight -1.0"]),
    (["--max-facts", "40"], ["--max-facts 40", "--n-keys 32"]),      # more facts than distinct keys
    (["--max-facts", "200"], ["--max-facts 200", "from 2 to 128"]),
    (["--n-keys", "0"], ["--n-keys 0"]),
    (["--n-keys", "16"], ["--max-facts 24", "--n-keys 16"]),
    (["--max-facts", "1"], ["--max-facts 1"]),
    (["--dense-facts", "0"], ["--dense-facts 0"]),
    (["--drill-facts", "33"], ["--drill-facts 33"]),
    (["--drill-frac", "1.5"], ["--drill-frac 1.5"]),
    (["--log-every", "0"], ["--log-every 0"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every -1"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--seeds", ""], ["--seeds ''", "is empty"]),
    (["--seeds", "0,,1"], ["--seeds '0,,1'", "'' is not an integer >= 0"]),
    (["--seeds", "0,x"], ["--seeds '0,x'", "'x' is not an integer >= 0", "e.g. 0,1,2"]),
    (["--seeds", "-1"], ["--seeds '-1'", "'-1' is not an integer >= 0"]),
    (["--seeds", "1.5"], ["'1.5' is not an integer"]),
    (["--seeds", "0,1,0"], ["--seeds 0,1,0", "seed 0 is named twice"]),
    (["--seed", "1", "--seeds", "0,1"], ["--seed 1 and --seeds 0,1", "not both"]),
    (["--jobs", "0"], ["--jobs 0", ">= 1"]),
    (["--until-plateau", "1000"], ["--until-plateau 1000", "less than --steps 2400"]),
    (["--until-plateau", "-1"], ["--until-plateau -1", ">= 0"]),
    (["--jobs", "-2"], ["--jobs -2"]),
    (["--eval-every", "0"], ["--eval-every 0", ">= 1"]),
    (["--eval-every", "2401"], ["--eval-every 2401", "more than --steps 2400"]),
    (["--steps", "abc"], ["--steps", "abc"]),
    (["--models", "gdn,mamba"], ["mamba"]),
    (["--models", "gdn,gdn"], ["twice"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--make-tokenizer", "--data", "x.txt"], ["--make-tokenizer", "--data"]),
    (["--device", "nonsense"], ["--device 'nonsense'"]),
])
def test_bad_flags_are_refused_before_any_work(flags, words, tmp_path, capsys):
    err = refused(capsys, [*flags, "--out", tmp_path / "out"])
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists()


def test_every_numeric_flag_has_a_checked_range():
    typed = {a.dest for a in cli.build_parser()._actions if a.type in (int, float)}
    assert typed == set(cli.INT_RANGES) | set(cli.FLOAT_RANGES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    err = refused(capsys, ["--device", "cuda", "--out", tmp_path / "out"])
    assert "--device cuda: torch sees no CUDA GPU" in err and "--device cpu" in err


def _bad_data(tmp_path, kind) -> Path:
    path = tmp_path / kind
    if kind == "folder":
        path.mkdir()
    elif kind == "binary.bin":
        path.write_bytes(bytes(range(256)) * 40)
    elif kind == "short.txt":
        path.write_text("Hello world!", encoding="utf-8")                 # 12 bytes
    return path


@pytest.mark.parametrize("kind, words", [
    ("folder", ["is a folder"]),
    ("binary.bin", ["not UTF-8 text", "byte"]),
    ("short.txt", ["--seq-len 128", "needs at least"]),
    ("missing.txt", ["no such file"]),
])
def test_bad_data_is_refused_before_training(kind, words, tmp_path, capsys):
    path = _bad_data(tmp_path, kind)
    err = refused(capsys, ["--data", path, "--out", tmp_path / "out"])
    assert str(path) in err and all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


def test_resume_refuses_other_settings_and_fewer_steps(tmp_path, text_file, capsys):
    out = tmp_path / "out"
    ts.main([*TINY, "--models", "gdn", "--data", str(text_file), "--out", str(out)])
    capsys.readouterr()
    before = snapshot(out)
    err = refused(capsys, [*TINY, "--models", "gdn", "--data", text_file, "--out", out, "--resume", "--d-model", "32"])
    assert "--d-model 32 (saved: 16)" in err and "gdn_seed0.pt" in err
    err = refused(capsys, [*TINY, "--models", "gdn", "--data", text_file, "--out", out, "--resume", "--lr", "0.01",
                           "--answer-weight", "2"])
    assert "--answer-weight 2.0 (saved: 1.0)" in err and "--lr 0.01 (saved: 0.0007)" in err
    # a checkpoint renamed to another seed's name holds that other seed: refused, not trained as the wrong seed
    (out / "gdn_seed0.pt").rename(out / "gdn_seed3.pt")
    err = refused(capsys, [*TINY, "--models", "gdn", "--data", text_file, "--out", out, "--resume", "--seeds", "3"])
    assert "gdn_seed3.pt" in err and "--seed 3 (saved: 0)" in err
    (out / "gdn_seed3.pt").rename(out / "gdn_seed0.pt")
    err = refused(capsys, [*TINY, "--models", "gdn", "--data", text_file, "--out", out, "--resume", "--steps", "3"])
    assert "--steps 3" in err and "step 4 of a 4-step schedule" in err
    # results.json is compared too: a model without a checkpoint would be evaluated differently
    err = refused(capsys, [*TINY, "--models", "gdn+swa", "--data", text_file, "--out", out, "--resume",
                           "--eval-batch", "2"])
    assert "results.json" in err and "--eval-batch 2 (saved: 1)" in err
    err = refused(capsys, [*TINY, "--data", text_file, "--out", tmp_path / "empty", "--resume"])
    assert "nothing to resume" in err
    assert snapshot(out) == before


def test_an_earlier_versions_one_seed_run_is_refused_by_resume_and_removed_by_overwrite(tmp_path, capsys):
    """Before --seeds, checkpoints were named gdn.pt and results.json had no seeds: --resume says so
    in one line instead of mixing layouts; --overwrite counts those files as this script's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "gdn_lte.pt").write_bytes(b"an old checkpoint")
    (out / "notes.txt").write_text("mine")
    err = refused(capsys, ["--resume", "--out", out])
    assert "earlier version of this script" in err and "gdn_lte.pt" in err and "--overwrite" in err
    (out / "gdn_lte.pt").unlink()
    (out / "results.json").write_text(json.dumps({"settings": {}, "models": {}}))
    err = refused(capsys, ["--resume", "--out", out])
    assert "earlier version of this script" in err and "results.json" in err
    (out / "gdn_state2x8.pt").write_bytes(b"old")
    assert [p.name for p in cli.output_files(out)] == ["gdn_state2x8.pt", "results.json"]
    cli.remove_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_file_as_out_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in refused(capsys, ["--out", tmp_path / "file"])


# ----------------------------------------------------------------------------------------------
# extending a run: the schedule, and the same result whenever the run was stopped
# ----------------------------------------------------------------------------------------------


def test_extended_run_keeps_its_schedule_then_the_final_learning_rate(tmp_path):
    args = cli.parse_args(["--steps", "100", "--out", str(tmp_path)])
    final = ts.FINAL_LR * args.lr
    assert ts.learning_rate(99, args) == pytest.approx(final, rel=0.01)
    assert ts.learning_rate(100, args, schedule_steps=100) == ts.learning_rate(250, args, schedule_steps=100) == final
    assert ts.learning_rate(30, args, schedule_steps=100) == ts.learning_rate(30, cli.parse_args(
        ["--steps", "100", "--out", str(tmp_path)]))
    # past its schedule a run keeps the mixed curriculum: no second block of text-free drills
    kinds = [recall_task.task_for_step(s, args, schedule_steps=60) for s in range(60, 100)]
    assert kinds.count("drill") == 10 and "haystack" in kinds


def test_extension_gives_the_same_model_whenever_the_run_was_stopped(tmp_path, monkeypatch):
    """Finish 8 steps then extend to 12, or Ctrl-C at step 5 of 8 and resume with 12: the same weights
    (the 8-step schedule, then its final learning rate), which differ from a fresh 12-step run."""
    device, tokens = torch.device("cpu"), np.arange(10_000, dtype=np.int64) % corpus.N_BPE

    def train(out, steps, *flags):
        args = cli.parse_args([*TINY, "--models", "gdn", "--steps", str(steps), "--out", str(out), *flags])
        return ts.train_model("gdn", args, tokens, corpus.VOCAB_SIZE, device)[0]

    train(tmp_path / "a", 8)
    extended = train(tmp_path / "a", 12, "--resume")

    real_batch = ts.training_batch

    def ctrl_c_at_step_4(tokens, step, args, *schedule):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)                    # what a user's Ctrl-C does
        return real_batch(tokens, step, args, *schedule)
    monkeypatch.setattr(ts, "training_batch", ctrl_c_at_step_4)
    with pytest.raises(SystemExit):
        train(tmp_path / "b", 8)
    monkeypatch.setattr(ts, "training_batch", real_batch)
    assert torch.load(cli.checkpoint_path(tmp_path / "b", "gdn", 0), weights_only=True)["step"] == 5
    stopped_then_extended = train(tmp_path / "b", 12, "--resume")

    for (name, a), b in zip(extended.state_dict().items(), stopped_then_extended.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = train(tmp_path / "c", 12)
    assert not torch.equal(fresh.wte.weight, extended.wte.weight)


# ----------------------------------------------------------------------------------------------
# the sample, the report, --help
# ----------------------------------------------------------------------------------------------


def test_sampled_prose_never_contains_recall_tokens_or_control_bytes():
    """An untrained model whose logits favour the key / value tokens and control bytes: unmasked
    sampling would give nothing but them (the recall tokens decode to nothing, so the prompt alone
    used to pass as the model's text)."""
    torch.manual_seed(0)
    model = tiny_hybrid.TinyHybrid(tiny_hybrid.Config.preset(
        "gdn+lte", vocab_size=corpus.VOCAB_SIZE, n_layer=2, d_model=16, head_dim=4, window=8, lte_buffer=4))
    forward = model.forward

    def favour_recall_tokens(*a, **kw):
        logits, loss = forward(*a, **kw)
        banned = torch.zeros(corpus.VOCAB_SIZE)
        banned[ts.NOT_PROSE] = 30.0
        return logits + banned, loss
    model.forward = favour_recall_tokens
    prompt = torch.arange(100, 116)[None]                                   # [1, 16]
    top = set(model(prompt)[0][0, -1].topk(40).indices.tolist())
    assert top <= set(ts.NOT_PROSE) and top & set(range(32)) and max(top) >= corpus.N_BPE
    ids = ts.sample_prose(model, prompt, 30, torch.Generator().manual_seed(0))
    assert len(ids) == 30 and not set(ids) & set(ts.NOT_PROSE)
    assert set(range(corpus.N_BPE, corpus.VOCAB_SIZE)) <= set(ts.NOT_PROSE)
    assert 10 not in ts.NOT_PROSE                                                    # newline is prose
    assert model.training                                                    # left as it was found


def test_sample_text_keeps_the_prompt_apart(tmp_path):
    enc = corpus.load_tokenizer()
    val_tokens = corpus.tokenize(enc, "To be, or not to be, that is the question. " * 40)
    args = cli.parse_args(["--out", str(tmp_path)])
    torch.manual_seed(0)
    model = tiny_hybrid.TinyHybrid(cli.model_config("gdn", cli.parse_args(["--d-model", "16", "--out", str(tmp_path)]),
                                                   corpus.VOCAB_SIZE))
    sample = ts.sample_text(model, enc, val_tokens, args, torch.device("cpu"), new_tokens=10)
    start = len(val_tokens) - 32                                                # a short text: its last 32 tokens
    assert sample["prompt"] == enc.decode(val_tokens[start:].tolist())
    assert sample["continuation"] and len(enc.encode_ordinary(sample["continuation"])) >= 5


def _results(recall: float, steps: int) -> dict:
    cells = {"2": {"1-4": recall, "5-8": recall}, "4": {"1-4": recall}}
    return {"eval": {"20": {"recall": cells}}, "steps": steps}


def test_chance_note_says_when_recall_at_chance_is_expected(tmp_path):
    args = cli.parse_args([*TINY, "--out", str(tmp_path)])
    assert report.chance_note({"gdn": _results(0.9, 40), "gdn+lte": _results(0.95, 40)}, args) == ""
    short = report.chance_note({"gdn": _results(0.03, 40), "gdn+lte": _results(0.9, 40)}, args)
    assert "expected after 40 steps" in short
    long = report.chance_note({"gdn": _results(0.03, 2400), "gdn+lte": _results(0.9, 2400)}, args)
    assert "for gdn: not learned" in long


def test_expected_tokens_match_the_batches(tmp_path):
    """The --use-triton time estimate counts the tokens that training will see."""
    args = cli.parse_args([*TINY, "--steps", "200", "--out", str(tmp_path)])
    tokens = np.arange(10_000, dtype=np.int64) % corpus.N_BPE
    seen = [ts.training_batch(tokens, s, args)["idx"].numel() for s in range(200)]
    train, evaluation = cli.expected_tokens(args)
    assert train == pytest.approx(sum(seen), rel=0.1) and evaluation > 0
    assert cli.expected_tokens(args, start=150)[0] == pytest.approx(sum(seen[150:]), rel=0.1)  # a resumed run


def test_help_shows_every_flag_with_its_default_and_one_quick_time():
    parser = cli.build_parser()
    formatter = cli.HelpFormatter("train_shakespeare.py")
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "(default: " in formatter._get_help_string(action), action.option_strings
    quick_help = next(a.help for a in parser._actions if a.dest == "quick")
    assert cli.QUICK_TIME in quick_help and cli.QUICK_TIME in ts.__doc__
    assert len(set(re.findall(r"(\d+) s on 2 CPU cores", ts.__doc__))) == 1


def test_flags_given_win_over_quick(tmp_path):
    args = cli.parse_args(["--quick", "--steps", "100", "--out", str(tmp_path)])
    assert (args.steps, args.eval_batch, args.log_every, args.eval_every, args.checkpoint_every) == (100, 4, 10, 5, 20)
    default = cli.parse_args(["--out", str(tmp_path)])
    assert (default.steps, default.eval_every, default.seeds, default.jobs) == (report.DEFAULT_STEPS, 100, [0], None)
    assert cli.parse_args(["--steps", "4800", "--out", str(tmp_path)]).eval_every == 200   # 24 readings a run
    assert cli.parse_args(["--seed", "3", "--out", str(tmp_path)]).seeds == [3]
    assert cli.parse_args(["--seeds", " 2, 0 ,5", "--out", str(tmp_path)]).seeds == [2, 0, 5]
