# Trimmed from OpenDCAI/DataFlow-MM at a5d48e00d5f28952a9438803238a97870f90b772 (Apache License 2.0,
# see bench/seed_side/LICENSE) to what the video caption example uses.
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .qwen_vl.qwen_vl_2_5 import Qwen2_5VLIO
else:
    import sys
    from dataflow.utils.registry import LazyLoader, generate_import_structure_from_type_checking
    cur_path = "dataflow/io/"

    _import_structure = generate_import_structure_from_type_checking(__file__, cur_path)
    sys.modules[__name__] = LazyLoader(__name__, "dataflow/io/", _import_structure, if_fuzzy_key_matching=True)
