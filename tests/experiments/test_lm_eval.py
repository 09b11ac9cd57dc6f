"""The lm-evaluation-harness adapter (experiments/lm_eval_model.py): loglikelihoods and is_greedy equal a hand
computation with the model, rolling loglikelihoods equal experiments.evaluate, generation equals model.generate,
batching changes nothing, and the command the README shows runs a local multiple-choice and a generation task
offline (YAML tasks over JSONL files written here), its logged loglikelihoods and texts equal the adapter's own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the eval extra: pip install 'switchyard-moe[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from experiments.data import DataConfig  # noqa: E402
from experiments.evaluate import EvalConfig, evaluate  # noqa: E402
from experiments.lm_eval_model import FIRST_ROUND, SwitchyardLM  # noqa: E402
from experiments.tokenizer import load_tokenizer  # noqa: E402
from moe.checkpoint import load_model  # noqa: E402
from tests.experiments.test_train import train  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXT = "line 12: the quick brown fox jumps over the lazy dog, and runs home 5.\n" * 2  # 142 bytes > max_seq_len 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, text_corpus) -> Path:
    """A tiny MoE trained for 100 steps on the corpus (byte tokenizer, max_seq_len 32): its greedy text varies."""
    run = tmp_path_factory.mktemp("lm_eval_run")
    train(run, text_corpus, "trainer.max_steps=100", "optim.lr=1e-2", "optim.warmup_steps=5")
    return run / "checkpoints" / "step_100"


@pytest.fixture(scope="module")
def lm(checkpoint) -> SwitchyardLM:
    return SwitchyardLM(checkpoint=str(checkpoint), device="cpu")


def ll_request(context: str, continuation: str) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


@torch.no_grad()
def hand_loglikelihood(checkpoint: Path, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of ln p of the continuation's tokens given all before them in the last 33 tokens (a window of 32
    predictions), and whether each is the model's argmax. The request split as lm-eval defines it: the context's
    trailing spaces belong to the continuation; the continuation's tokens are those of the whole string after the
    context's; an empty context is the end-of-text token."""
    tok, model = load_tokenizer(checkpoint), load_model(checkpoint).eval()
    if context:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx):]
    else:
        ctx, cont = [tok.eos_id], tok.encode(continuation)
    whole = (ctx + cont)[-33:]
    n = min(len(cont), len(whole) - 1)
    logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
    rows, target = logp[len(whole) - 1 - n:], torch.tensor(whole[-n:])
    return float(rows[torch.arange(n), target].sum()), bool((rows.argmax(-1) == target).all())


REQUESTS = [("line 3: the quick", " brown fox"), ("jumps over the ", "lazy dog"), ("", "home 4."),
            ("the lazy dog, and runs " * 3, "home 1.")]  # the last is longer than the window: its last 33 tokens


def test_registered_under_its_name():
    assert get_model("switchyard") is SwitchyardLM


def test_loglikelihood_equals_hand_computation(lm, checkpoint):
    got = lm.loglikelihood([ll_request(c, x) for c, x in REQUESTS], disable_tqdm=True)
    for (c, x), (score, greedy) in zip(REQUESTS, got):
        want, want_greedy = hand_loglikelihood(checkpoint, c, x)
        assert score == pytest.approx(want, rel=1e-5, abs=1e-4) and greedy == want_greedy
        assert score < 0


def test_batching_and_padding_change_nothing(checkpoint, lm):
    one = lm.loglikelihood([ll_request(c, x) for c, x in REQUESTS], disable_tqdm=True)
    four = SwitchyardLM(checkpoint=str(checkpoint), device="cpu", batch_size=4)
    batched = four.loglikelihood([ll_request(c, x) for c, x in REQUESTS], disable_tqdm=True)
    for (a, ga), (b, gb) in zip(one, batched):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-5) and ga == gb


def test_is_greedy_on_the_models_own_argmax(lm):
    """A continuation of the model's argmax tokens is greedy (True), one token changed makes it False; scores are
    the sums of those tokens' log-probabilities."""
    model, ctx = lm.model, lm.tok_encode("line 7: the quick brown")
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    cont = ids[len(ctx):]
    other = cont[:-1] + [(cont[-1] + 1) % lm.tokenizer.vocab_size]
    (s1, g1), (s2, g2) = lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx, other)])
    pos = torch.arange(len(ctx) - 1, len(ids) - 1)
    assert g1 is True and g2 is False
    assert s1 == pytest.approx(float(logp[pos, torch.tensor(cont)].sum()), abs=1e-4)
    assert s2 == pytest.approx(float(logp[pos, torch.tensor(other)].sum()), abs=1e-4) and s2 < s1


def test_rolling_loglikelihood_equals_evaluate(lm, checkpoint, tmp_path):
    """A perplexity task's score is -(the nats experiments.evaluate sums over the same text) when the windows are the
    same: a token count that is a multiple of max_seq_len (lm-eval gives a shorter last window more context)."""
    text = TEXT[:4 * 32]  # 128 bytes: four windows of 32 in both
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    (rec,) = evaluate(EvalConfig([str(checkpoint)], data=DataConfig(source="text", path=str(path)), device="cpu",
                                 progress=False), log=lambda *_: None)
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert rec["windows"] == 4 and rec["tokens"] == 128
    assert rolling == pytest.approx(-rec["sum_nats"], rel=1e-5)


def test_generation_equals_model_generate(lm):
    """Greedy generate_until equals one model.generate call of max_gen_toks tokens cut at the first stop string,
    for prompts of different lengths batched together (left-padded) and alone, across generation rounds."""
    prompts = ["line 2: the quick brown", "over the lazy", "line 150: the quick brown fox jumps"]
    eot = lm.eot_token_id
    free = []
    for p in prompts:  # the reference: one call, 40 tokens (> the adapter's first round of 16)
        ids = lm.tok_encode(p)
        out = lm.model.generate(torch.tensor([ids]), 40, temperature=0.0, eos_id=eot)[0, len(ids):].tolist()
        free.append(lm.tok_decode(out[:out.index(eot)] if eot in out else out))
    # a stop string first seen in the first text after the adapter's first round of 16 tokens (bytes here)
    stop = next(free[0][i:i + n] for n in range(2, 9) for i in range(FIRST_ROUND + 1, len(free[0]) - n + 1)
                if free[0].find(free[0][i:i + n]) == i)
    want = [t.split(stop, 1)[0] for t in free]
    assert len(want[0]) > FIRST_ROUND and len(free[0]) > len(want[0])
    reqs = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 40, "do_sample": False}), 0)
            for p in prompts]
    assert lm.generate_until(reqs, disable_tqdm=True) == want, (stop, free)
    batched = SwitchyardLM(checkpoint=str(lm.checkpoint_path), device="cpu", batch_size=3)
    assert batched.generate_until(reqs, disable_tqdm=True) == want


def test_errors_name_the_argument(checkpoint):
    with pytest.raises(ValueError, match="needs --model_args checkpoint=DIR"):
        SwitchyardLM(device="cpu")
    with pytest.raises(ValueError, match=r"unknown --model_args \['pretrained'\]"):
        SwitchyardLM(checkpoint=str(checkpoint), pretrained="gpt2")
    with pytest.raises(ValueError, match="--batch_size auto"):
        SwitchyardLM(checkpoint=str(checkpoint), batch_size="auto", device="cpu")
    lm = SwitchyardLM(checkpoint=str(checkpoint), device="cpu")
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"until": ["\n"], "num_beams": 4}), 0)])


# ------------------------------------------------------------------------------------------ the command line

MC_DOCS = [{"question": "line 3: the quick brown", "choices": ["fox", "dog", "cat"], "answer": 0},
           {"question": "jumps over the lazy", "choices": ["dog", "fox"], "answer": 0},
           {"question": "the lazy dog, and runs", "choices": ["home", "away", "off"], "answer": 0}]
GEN_DOCS = [{"prompt": "line 1: the quick", "target": " brown"}, {"prompt": "jumps over", "target": " the"}]


def write_tasks(root: Path) -> Path:
    """Two lm-eval tasks over local JSONL files (`dataset_path: json`): nothing is downloaded."""
    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (tasks / "sy_mc.yaml").write_text(
        "task: sy_mc\n" + common.format(path=tasks / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "sy_gen.yaml").write_text(
        "task: sy_gen\n" + common.format(path=tasks / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \",\"]\n  max_gen_toks: 20\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


@pytest.mark.slow  # lm_eval's own start-up (datasets, its task index) takes most of ~15 s
def test_command_line_runs_local_tasks(checkpoint, lm, tmp_path):
    """python -m experiments.lm_eval_model --model switchyard --model_args checkpoint=DIR --tasks ... (the README's
    command), offline: the samples it logs carry the adapter's own loglikelihoods and generations, and acc is the
    share of documents whose right answer has the highest loglikelihood."""
    tasks = write_tasks(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "experiments.lm_eval_model", "--model", "switchyard", "--model_args",
           f"checkpoint={checkpoint}", "--tasks", "sy_mc,sy_gen", "--include_path", str(tasks), "--device", "cpu",
           "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = {name: [json.loads(line) for p in (tmp_path / "out").rglob(f"samples_{name}_*.jsonl")
                      for line in p.read_text().splitlines()] for name in ("sy_mc", "sy_gen")}
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]

    mc = sorted(samples["sy_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == len(MC_DOCS)
    correct = 0
    for doc, s in zip(MC_DOCS, mc):
        ours = lm.loglikelihood([ll_request(doc["question"], " " + c) for c in doc["choices"]], disable_tqdm=True)
        logged = [float(r[0][0]) for r in s["resps"]]
        assert logged == pytest.approx([score for score, _ in ours], abs=1e-4)
        correct += max(range(len(logged)), key=logged.__getitem__) == doc["answer"]
    assert results["sy_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))

    gen = sorted(samples["sy_gen"], key=lambda s: s["doc_id"])
    ours = lm.generate_until([Instance("generate_until", {}, (d["prompt"], {"until": ["\n", ","], "max_gen_toks": 20,
                                                                             "do_sample": False}), 0)
                              for d in GEN_DOCS], disable_tqdm=True)
    assert [s["resps"][0][0] for s in gen] == ours and all("," not in t and "\n" not in t for t in ours)
    assert results["sy_gen"]["exact_match,none"] == pytest.approx(
        sum(t == d["target"] for t, d in zip(ours, GEN_DOCS)) / len(GEN_DOCS))


def test_console_script_is_declared():
    """pyproject installs the same command as `switchyard-lm-eval`, and the eval extra is part of dev."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["switchyard-lm-eval"] == "experiments.lm_eval_model:main"
    assert any(r.startswith("lm-eval") for r in project["optional-dependencies"]["eval"])
    assert "eval" in project["optional-dependencies"]["dev"][0]
