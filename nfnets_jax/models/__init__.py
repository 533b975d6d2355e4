"""Normalizer-free model families as Haiku modules.

`NFNet`, `NFResNet` and `NFRegNet` reproduce the published parameter trees, so
published checkpoints load unchanged; `TimmNFNet` ('timm:eca_nfnet_l0', ...) is
every model of timm's nfnet.py, computing what timm's compute (timm_family.py). Look models up by name with
`create_model('nfnet:F0')` / `transform('nfnet:F0')`; size them with
`count_params` and `count_flops`; check a parameter tree
against a model with `check_params` (tree.py). Trained weights come in through
`nfnets_jax.weights` (`weights.pretrained('nfnet:F0')`). `BNResNet` ('bn_resnet:ResNet50') is the
batch-normalised baseline for signal-propagation comparisons; it has state,
so build it with `transform_with_state`.

How a model is lowered (never what it computes) is fixed when it is built:
`transform(name, ..., conv_impl='auto'|'xla'|'decomposed',
block_loop='auto'|'scan'|'unroll')` (see `conv.py` and `network.py`). A model
that scans runs of blocks keeps their parameters stacked (`stacked_layout`,
see `stacking.py`); the published tree is the format of files. `transform`
builds models with `fast_init.transform`, whose init gives Haiku's weights for
a seed but compiles in seconds for deep variants. `fold_for_inference` turns
trained parameters into a plain convolutional network for serving (folding.py).
"""

from nfnets_jax.models import fast_init
from nfnets_jax.models.activations import ACTIVATION_NAMES, GAMMAS, get_activation
from nfnets_jax.models.architecture import BlockSpec, ConvSpec, NetworkPlan, StemSpec
from nfnets_jax.models.bn_resnet import BNResNet
from nfnets_jax.models.conv import IMPLS as CONV_IMPLS
from nfnets_jax.models.folding import FoldedModel, fold_for_inference
from nfnets_jax.models.layers import (ChannelAttention, SqueezeExcite, StochDepth, WSConv2D,
                                      signal_metrics, standardize_weight)
from nfnets_jax.models.network import BLOCK_LOOPS, NFBlock, NormFreeNet
from nfnets_jax.models.nf_regnet import NFRegNet
from nfnets_jax.models.nf_resnet import NFResNet
from nfnets_jax.models.nfnet import NFNet
from nfnets_jax.models.registry import (COMPUTE_DTYPES, FAMILIES, count_flops, count_params,
                                        create_model, default_image_size, is_stateful,
                                        list_models, model_plan, param_shapes, parse_model_name,
                                        published_tree, stacked_layout, transform,
                                        transform_with_state)
from nfnets_jax.models.stacking import StackedLayout
from nfnets_jax.models.timm_family import TimmNFNet
from nfnets_jax.models.tree import (ParameterMismatchError, check_params, check_shapes,
                                    infer_model, infer_num_classes)

__all__ = [
    "ACTIVATION_NAMES", "GAMMAS", "get_activation",
    "BlockSpec", "ConvSpec", "NetworkPlan", "StemSpec",
    "ChannelAttention", "SqueezeExcite", "StochDepth", "WSConv2D", "signal_metrics", "standardize_weight",
    "CONV_IMPLS", "BLOCK_LOOPS",
    "NFBlock", "NormFreeNet", "NFNet", "NFResNet", "NFRegNet", "BNResNet", "TimmNFNet",
    "COMPUTE_DTYPES", "FAMILIES", "count_flops", "count_params", "create_model",
    "default_image_size", "is_stateful", "list_models", "model_plan", "param_shapes",
    "parse_model_name", "published_tree", "transform", "transform_with_state",
    "ParameterMismatchError", "check_params", "check_shapes", "infer_model", "infer_num_classes",
    "StackedLayout", "stacked_layout", "fast_init", "FoldedModel", "fold_for_inference",
]
