"""The Triton kernels, as ``cpd_mtp.kernels``, when cpd_mtp runs from a source checkout.

The kernel modules live in the repository's top-level ``kernels/`` folder. That folder has no
``__init__.py`` on purpose: a folder without one is only a namespace portion, and Python prefers
any regular package of the same name found anywhere on ``sys.path``. So when the repository root
is on ``sys.path`` (``python -m``, ``python -c``, a test's subprocess), ``import kernels`` still
finds the PyPI package ``kernels`` that ``transformers`` imports, never this project's kernels.

An installed wheel does not use this file: ``setup.cfg`` maps the ``kernels/`` folder itself to
``cpd_mtp/kernels/``. Here, in a checkout, this package only points its search path at that
folder, so ``cpd_mtp.kernels.ops`` and its siblings import from there.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "kernels")]
