"""transferlab: five knowledge-transfer papers as PyTorch tools, shown on real offline data.

Methods live in subpackages: `transferlab.emoe`, `transferlab.metadmoe`, `transferlab.cuber`,
`transferlab.kind`, `transferlab.cprd`. Shared machinery is in `transferlab.core`.
"""

__version__ = "0.1.0"

from .core.engine import Engine  # noqa: E402
from .core.errors import DataNotFoundError, UserError  # noqa: E402

__all__ = ["Engine", "UserError", "DataNotFoundError", "__version__"]
