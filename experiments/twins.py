"""python -m experiments.twins [OVERRIDES...]: the FLOP-matched twins (moe/twins.py) of the model that
`python -m experiments.train OVERRIDES` would train, as a table: the same Hydra composition, the model sized to its
data's vocabulary and trainer.seq_len, the routers its twin_router setting picks."""
from __future__ import annotations

from typing import Any, Optional

from moe.twins import twin_names, twin_table


def data_vocab_size(data: Any) -> int:
    """The vocabulary the trainer will size the model to for the DataConfig `data`, without tokenizing anything:
    the byte tokenizer's 257, the requested BPE size, or a token corpus's data.vocab_size."""
    from experiments.data import DEFAULT_BPE_VOCAB  # late: experiments.data imports numpy and torch
    from experiments.tokenizer import ByteTokenizer

    if data.source != "tokens" and data.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    return data.vocab_size or DEFAULT_BPE_VOCAB


def composed_table(overrides: list[str]) -> tuple[str, list[dict]]:
    """The twins table of the run that `python -m experiments.train OVERRIDES` would start: the same Hydra
    composition (conf/train.yaml, found by path), its model as the base, sized to its data's vocabulary and
    trainer.seq_len. Rows: the default sweep's twins, then the experiment's own sweep (hydra.sweeper.params.twin)
    and the run's twin= when they are not among them. Returns a heading and the rows."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.config import TrainConfig
    from experiments.hydra_conf import CONFIG_DIR, register_configs
    from experiments.typed_config import from_mapping

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    sweep = OmegaConf.select(cfg, "hydra.sweeper.params.twin")
    d = OmegaConf.to_container(cfg, resolve=False)
    d.pop("hydra", None)
    train = from_mapping(TrainConfig, OmegaConf.to_container(OmegaConf.create(d), resolve=True))
    base = train.model.replace(vocab_size=data_vocab_size(train.data))
    seq_len = min(train.trainer.seq_len, base.max_seq_len)
    names = twin_names()
    extra = [n.strip() for n in str(sweep).split(",")] if sweep is not None else []
    names += [n for n in extra + ([train.twin] if train.twin else []) if n not in names]
    heading = (f"twins of model (vocabulary {base.vocab_size}, d_model {base.d_model}, d_ff {base.d_ff}, "
               f"{base.n_layer} layers) at seq_len {seq_len}")
    rows = []
    for name in names:  # one row each; a twin this base cannot match (say, at a twin_width_multiple) says why
        try:
            rows += twin_table(base, [name], seq_len=seq_len, routers=train.twin_router,
                               multiple_of=train.twin_width_multiple)
        except ValueError as e:
            rows.append({"twin": name, "refused": str(e)})
    return heading, rows


def format_row(r: dict) -> str:
    if "refused" in r:
        return f"{r['twin']:>18}  refused: {r['refused']}"
    return (f"{r['twin']:>18}  f={r['expert_hidden'] or r['d_ff']:>5}  total {r['params_total']:>11,}  "
            f"active {r['params_active']:>9,}  {r['training_flops_per_token']:.4g} FLOPs/token "
            f"({r['flops_vs_dense']:.4f} x dense)")


def main(argv: Optional[list[str]] = None) -> None:
    """python -m experiments.twins [OVERRIDES...]: the overrides of experiments.train (e.g. experiment=demo)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print("python -m experiments.twins [OVERRIDES...]: the FLOP-matched twins of the model that "
              "`python -m experiments.train OVERRIDES` trains (e.g. experiment=demo, model=tiny_dense data.tokenizer=byte)")
        return
    heading, rows = composed_table(args)
    print(heading)
    for r in rows:
        print(format_row(r))


if __name__ == "__main__":
    main()
