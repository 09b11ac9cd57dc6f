"""python -m experiments.train [model=PRESET] [routing=ROUTER] [data=CORPUS] [trainer.max_steps=N] ...

Composes the Hydra config, turns it into plain dataclasses (experiments.config) and trains. Returns the final
validation loss, so Hydra sweepers (e.g. Optuna) can minimise it.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.app_options import ConfigError, exits_on_config_error, resolved
from experiments.config import run_config_from_dict
from experiments.hydra_conf import CONFIG_DIR, register_configs

register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
@exits_on_config_error("train")
def main(cfg: DictConfig) -> float | None:
    # torch and the trainer load only once a run starts: `--help`, `--cfg job` and tab completion need neither.
    from experiments.preemption import Preempted, exit_preempted
    from experiments.trainer import Trainer

    hydra_cfg = HydraConfig.get()
    d = resolved(cfg, "python -m experiments.train [model=PRESET] [data=CORPUS] [key=value ...]")
    logger = d.get("logger")
    if hydra_cfg.mode == RunMode.MULTIRUN and isinstance(logger, dict) and logger.get("group") is None:
        logger["group"] = Path(hydra_cfg.sweep.dir).name  # the runs of one sweep share a group (wandb, run.json)
    try:
        run = run_config_from_dict(d, hydra_cfg.runtime.output_dir)
    except ValueError as e:  # the config as a whole, checked before any data is read: the user's to fix
        raise ConfigError(str(e)) from None
    trainer = Trainer(run)
    try:
        summary = trainer.fit()
    except Preempted as e:
        print(e)
        exit_preempted(e)  # hands the signal to a requeueing handler (submitit), then exits with PREEMPTED_EXIT
    finally:
        trainer.engine.close()  # under torchrun: leaves the process group
    if not trainer.ranks.is_main:
        return summary["final_val_loss"]
    print(f"final validation loss {summary['final_val_loss']:.4f} nats "
          f"(unigram entropy of the validation split: {summary['unigram_entropy']:.4f})")
    print(f"metrics:    {summary['metrics']}")
    print(f"checkpoint: {summary['checkpoint']}")
    return summary["final_val_loss"]


if __name__ == "__main__":
    main()
