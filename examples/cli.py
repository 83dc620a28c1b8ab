"""Train any lightning-pinn problem from a YAML file with Lightning's own CLI.

    python examples/cli.py fit --config examples/harmonic_balanced.yaml
    python examples/cli.py fit --config examples/harmonic_balanced.yaml --trainer.max_steps 500
    python examples/cli.py fit --help                 # every option, from the classes' docstrings

The model is any subclass of ``PINNModule`` (``model.class_path``); callbacks are listed under
``trainer.callbacks`` with ``class_path``/``init_args``. Needs ``pip install "jsonargparse[signatures]"``
(part of the ``cli`` and ``dev`` extras).
"""

from pytorch_lightning.cli import LightningCLI

from lightning_pinn import PINNModule


def main(args=None):  # noqa: ANN001, ANN201 - LightningCLI accepts a list of strings or a dict
    return LightningCLI(PINNModule, subclass_mode_model=True, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
