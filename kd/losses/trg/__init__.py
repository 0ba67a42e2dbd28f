"""TRG: token-level relationship graph distillation, added to any logit loss by a recipe's ``loss.trg`` section.

    TRGLoss(logit_loss, cfg.trg, context=context)   # what build_loss returns when loss.trg is set

`terms` holds the three terms as per-node losses on a sampled node set (the spec, with the math); `loss` the module
that samples the nodes, owns the projector(s) and composes the terms with the logit loss.
"""
from kd.losses.trg.loss import TRGLoss, layer_pairs
from kd.losses.trg.terms import (contextual_loss, gather_nodes, global_contrastive_loss, local_graph_loss, normalize,
                                 sample_nodes)

__all__ = ["TRGLoss", "contextual_loss", "gather_nodes", "global_contrastive_loss", "layer_pairs", "local_graph_loss",
           "normalize", "sample_nodes"]
