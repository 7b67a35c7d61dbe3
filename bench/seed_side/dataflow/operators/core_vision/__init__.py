# Trimmed from OpenDCAI/DataFlow-MM at a5d48e00d5f28952a9438803238a97870f90b772 (Apache License 2.0,
# see bench/seed_side/LICENSE) to what the video caption example uses.
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # === Generate ===
    from .generate.prompted_vqa_generator import PromptedVQAGenerator
    from .generate.video_caption_generator import VideoToCaptionGenerator

else:
    import sys
    from pathlib import Path
    from dataflow.utils.registry import LazyLoader, generate_import_structure_from_type_checking
    cur_path = "dataflow/operators/core_vision/"
    _import_structure = generate_import_structure_from_type_checking(__file__, cur_path)
    _loader = LazyLoader(__name__, "dataflow/operators/core_vision/", _import_structure)
    _loader.__path__ = [str(Path(__file__).parent)]
    sys.modules[__name__] = _loader
