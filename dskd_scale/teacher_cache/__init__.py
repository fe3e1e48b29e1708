"""Teacher hidden-state cache: the teacher's final hidden states at the rows the losses use, written once by
``tools/cache_teacher.py`` (``dskd_scale.teacher_cache.writer``) and read during training (``TeacherCache``).

Format and contract: docs/design.md ("Teacher cache") and ``dskd_scale.teacher_cache.format``. No deepspeed
imports in this package; the writer is not imported here (it needs the prealigned-data reader and the model
builders), so importing the reader stays cheap and cycle-free.
"""

from dskd_scale.teacher_cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    CONFIG_KEY,
    DTYPES,
    MODES,
    CacheMismatch,
    configured_teacher_fingerprint,
    data_fingerprint,
    random_teacher_fingerprint,
    teacher_fingerprint,
    text_fingerprint,
)
from dskd_scale.teacher_cache.reader import TeacherCache

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "CONFIG_KEY", "DTYPES", "MODES", "CacheMismatch", "TeacherCache",
           "configured_teacher_fingerprint", "data_fingerprint", "random_teacher_fingerprint", "teacher_fingerprint",
           "text_fingerprint"]
