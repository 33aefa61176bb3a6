"""accord: align and merge neural networks.

The data path: trace → statistics → match → apply → combine → repair → evaluate → save.
Every alignment and combiner is one record (:mod:`accord.registry`: :data:`ALIGNMENTS`,
:data:`COMBINERS`).
"""

from accord._version import __version__ as __version__
from accord.analysis.selection import Selection, select_checkpoints
from accord.apply import Transform, apply_transforms
from accord.batchnorm import fold_batchnorms, reset_batchnorm
from accord.check import SpecCheck, check_spec, randomly_permuted
from accord.checkpoint import Checkpoint, LazyState, load_checkpoint, open_checkpoint
from accord.combine import merge_state_dicts
from accord.config import MergeConfig
from accord.data import (
    DATASETS,
    DataSplits,
    default_dataset,
    load_dataset,
    split_indices,
    task_classes,
)
from accord.errors import (
    AccordError,
    CheckpointError,
    ConfigError,
    DataError,
    MergeError,
    ModelError,
    OutputError,
    SpecError,
    StatisticsError,
    StoreError,
    TraceError,
)
from accord.evaluate import (
    Evaluation,
    InterpolationCurve,
    TaskEvaluation,
    evaluate,
    evaluate_ensemble,
    evaluate_tasks,
    evaluate_with_ensemble,
    interpolation_curve,
)
from accord.match import MATCHERS
from accord.merge import MergeResult, merge
from accord.models import UserModel, load_user_model
from accord.models.merging import run_user_merge
from accord.partial import PartialMerge, parameters_kept
from accord.registry import ALIGNMENTS, COMBINERS
from accord.spec import AxisRef, FeatureSpace, Observation, Spec, spec_table
from accord.statistics import SpaceStatistics, Statistics, collect_statistics
from accord.store import (
    checkpoint_dataset,
    list_checkpoints,
    save_checkpoint,
    training_steps,
)
from accord.trace import trace
from accord.trace.programs import shared_exports
from accord.train import Keep, ModelSetRequest, TrainConfig, train_model, train_model_set
from accord.workflow import run_merge
from accord.zoo import MODELS, build_model, example_input, model_config, set_class_embeddings

__all__ = [
    "ALIGNMENTS",
    "COMBINERS",
    "DATASETS",
    "MATCHERS",
    "MODELS",
    "AccordError",
    "AxisRef",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataSplits",
    "Evaluation",
    "FeatureSpace",
    "InterpolationCurve",
    "Keep",
    "LazyState",
    "MergeConfig",
    "MergeError",
    "MergeResult",
    "ModelError",
    "ModelSetRequest",
    "Observation",
    "OutputError",
    "PartialMerge",
    "Selection",
    "SpaceStatistics",
    "Spec",
    "SpecCheck",
    "SpecError",
    "Statistics",
    "StatisticsError",
    "StoreError",
    "TaskEvaluation",
    "TraceError",
    "TrainConfig",
    "Transform",
    "UserModel",
    "apply_transforms",
    "build_model",
    "check_spec",
    "checkpoint_dataset",
    "collect_statistics",
    "default_dataset",
    "evaluate",
    "evaluate_ensemble",
    "evaluate_tasks",
    "evaluate_with_ensemble",
    "example_input",
    "fold_batchnorms",
    "interpolation_curve",
    "list_checkpoints",
    "load_checkpoint",
    "load_dataset",
    "load_user_model",
    "merge",
    "merge_state_dicts",
    "model_config",
    "open_checkpoint",
    "parameters_kept",
    "randomly_permuted",
    "reset_batchnorm",
    "run_merge",
    "run_user_merge",
    "save_checkpoint",
    "select_checkpoints",
    "set_class_embeddings",
    "shared_exports",
    "spec_table",
    "split_indices",
    "task_classes",
    "trace",
    "train_model",
    "train_model_set",
    "training_steps",
]
