"""Where ``Engine`` lived before the package had layers; kept so existing scripts keep working.

New code: ``from framepack_local import Engine`` (or ``framepack_local.engine.generate``).
"""

from .engine.generate import Engine, JobResult

__all__ = ["Engine", "JobResult"]
