"""Built-in methods. Importing this package registers each of them (explicitly, no package walk)."""

from . import asvd, gptq, rtn, sparsegpt, svd, wanda  # noqa: F401
from .hypernet import method as _hypernet  # noqa: F401
from .kan import method as _kan  # noqa: F401
from .qat import method as _qat  # noqa: F401
from . import distill_factors, factor_embedding, kv_lowrank, rotation  # noqa: F401
from .structured import method as _structured  # noqa: F401
