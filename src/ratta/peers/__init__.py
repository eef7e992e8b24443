r"""Training-free test-time adaptation peers of RA-TTA, as pure tensor functions.

Five methods that keep CLIP frozen and need no gradient, computed from the features ratta
already caches (z_0 and the stored views; nothing is re-encoded) and a classifier W [C, d]
with its logit scale s. Spec: ``docs/peers.md``.

- Episodic (each image alone, batched): :func:`zero` (ZERO), :func:`mta` (MTA).
- Online (a state carried along a stream of images): :func:`tda` (TDA), :func:`boost`
  (BoostAdapter), :func:`dmn` (DMN-ZS). Each has a batched, stream-independent preparation
  (:func:`tda_inputs`, :func:`boost_views`, :func:`dmn_inputs`) computed once per image, and
  a state (:class:`TDAState`, :class:`BoostState`, :class:`DMNState`) whose ``step`` takes
  the next images in stream order; :func:`tda` etc. run a whole stream given its order
  (:func:`shuffled_streams`, :func:`correlated_streams`).
- :func:`view_logits` computes s x W^T once for all peers (pass it as ``logits=``).

Every method returns :class:`PeerOutput`: ``scores`` to rank classes and ``probs`` for ECE
(softmax of the final logits for MTA, TDA, BoostAdapter; the normalised votes for ZERO;
(p(z_0) + gamma p_mem) / (1 + gamma) for DMN-ZS).

Faithful to the official code by default, numerics included where they change decisions;
where the official code has a bug that is not the method, the intended behaviour:
- ZERO's tie-break fallback: ``logit[~ties]`` on an index tensor masks the wrong classes;
  here the argmax of the first discarded input is restricted to the tied classes.
- TDA's and BoostAdapter's image loaders drop every file whose name contains "sh"
  (ImageNet-A: 6,862 of 7,500 images kept); here every image of the split is used.
- StatA's correlated streams draw the Dirichlet shares from an unseeded generator; here
  every stream is a function of the seed.
Not reproduced: the float16 arithmetic of the official runs (inputs are computed in their
own dtype, float32 or float64), except ZERO's vote temperature, float16's epsilon, and its
float32 votes (autocast's softmax), where ties are decided.
"""

from ratta.peers.common import PeerOutput, fill, take, view_logits
from ratta.peers.defaults import PeerDefaults, Source, peer_defaults
from ratta.peers.dmn import DMNConfig, DMNInputs, DMNState, dmn, dmn_inputs
from ratta.peers.mta import MTAConfig, mta
from ratta.peers.prompts import peer_prompts
from ratta.peers.streams import correlated_streams, shuffled_streams
from ratta.peers.tda import (
    BoostConfig,
    BoostState,
    BoostViews,
    TDAConfig,
    TDAInputs,
    TDAState,
    boost,
    boost_views,
    tda,
    tda_inputs,
)
from ratta.peers.zero import ZeroConfig, zero

__all__ = [
    "BoostConfig",
    "BoostState",
    "BoostViews",
    "DMNConfig",
    "DMNInputs",
    "DMNState",
    "MTAConfig",
    "PeerDefaults",
    "PeerOutput",
    "Source",
    "TDAConfig",
    "TDAInputs",
    "TDAState",
    "ZeroConfig",
    "boost",
    "boost_views",
    "correlated_streams",
    "dmn",
    "dmn_inputs",
    "fill",
    "mta",
    "peer_defaults",
    "peer_prompts",
    "shuffled_streams",
    "take",
    "tda",
    "tda_inputs",
    "view_logits",
    "zero",
]
