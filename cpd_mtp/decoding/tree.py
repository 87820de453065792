"""Draft trees: many candidate continuations, verified in one trunk forward.

A batch of trees is a few (b, N) tensors (``DraftTree``). Node 0 of every row is the root: the
token x_{t+1} the verifier already chose, fed with the drafts because its keys and values are
not cached yet. Nodes 1..N-1 are drafts; each has a parent of smaller index (so the nodes are in
topological order, and a path lists its nodes in increasing index order). A chain of m drafts
is the tree whose node j has parent j - 1.

One forward feeds all N nodes of a row:

- position id of a node = the row's cached length + the node's depth;
- a 4-D attention mask lets each node see the row's cached prefix, its ancestors and itself
  (``tree_attention_mask``), with the model's sliding window where it has one.

The verifier's distribution at node u is the distribution of the token after u's path, so the
targets of u's children are read at u. Verification (``verify``, one walk for every mode) goes
down from the root into the child whose token is the verifier's choice after the current node
(siblings are distinct, so at most one matches) and returns the accepted path and the token
that follows it:

- greedy: the choice is the argmax of the model's scores (``torch.argmax``: the first maximum,
  as Hugging Face's greedy search);
- sampling: the choice is argmax(log p + G) for the (warped) model distribution p and the
  coupled Gumbel noise G of that output position (``cpd_mtp.decoding.noise``): a draw from p,
  independent of the drafts, so the output is distributed exactly as autoregressive sampling
  and is the same for any tree.

A lossy rule (``cpd_mtp.decoding.acceptance``) passes its own (b, N) acceptable nodes instead
of "the token is the verifier's choice"; several siblings may then be acceptable, and the walk
takes the child on the longest acceptable path below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DraftTree",
    "TreePath",
    "ancestor_matrix",
    "chain_tree",
    "tree_attention_mask",
    "verify",
]


@dataclass
class DraftTree:
    """A batch of draft trees with N nodes per row (node 0: the root).

    Attributes:
        tokens: (b, N) int64 token of each node.
        parents: (b, N) int64 parent index, < the node's own; -1 for the root.
        depth: (b, N) int64 depth; 0 for the root.
        valid: (b, N) bool; False marks padding nodes of a row whose tree is smaller (their
            outputs are ignored and they are never accepted).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor

    @property
    def size(self) -> int:
        """N, nodes per row, the root included."""
        return self.tokens.shape[1]

    @property
    def is_chain(self) -> bool:
        """Whether every row is one chain: node j's parent is j - 1 (a row's invalid nodes, its
        padding, come after its valid ones and are never accepted)."""
        n = self.size
        chain = torch.arange(-1, n - 1, device=self.parents.device)
        return bool((self.parents == chain).all())

    def select(self, rows: torch.Tensor) -> DraftTree:
        """The trees of the given rows."""
        return DraftTree(
            self.tokens[rows],
            self.parents[rows],
            self.depth[rows],
            self.valid[rows],
        )


def chain_tree(root: torch.Tensor, drafts: torch.Tensor) -> DraftTree:
    """The chain [root, d_1, ..., d_m] as a tree: (b,) root and (b, m) drafts."""
    b, m = drafts.shape
    device = drafts.device
    tokens = torch.cat([root[:, None], drafts], dim=1)
    index = torch.arange(m + 1, device=device)
    return DraftTree(
        tokens=tokens,
        parents=(index - 1).expand(b, -1).contiguous(),
        depth=index.expand(b, -1).contiguous(),
        valid=torch.ones(b, m + 1, dtype=torch.bool, device=device),
    )


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """(b, N) parents -> (b, N, N) bool: entry [u, v] is True when v is u or an ancestor of u.

    Parents precede their children, so one pass in index order fills every row from its
    parent's.
    """
    b, n = parents.shape
    rows = torch.eye(n, dtype=torch.bool, device=parents.device).expand(b, n, n).clone()
    for u in range(1, n):
        parent = parents[:, u].clamp(min=0)  # (b,)
        rows[:, u] |= rows[torch.arange(b, device=parents.device), parent] & (
            parents[:, u, None] >= 0
        )
    return rows


def tree_attention_mask(
    prefix_mask: torch.Tensor,
    tree: DraftTree,
    n_valid: torch.Tensor,
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The additive (b, 1, N, S + N) attention mask of a tree forward.

    Args:
        prefix_mask: (b, S) bool, the row's real cache slots (right-aligned: slot distance is
            position distance, see ``cpd_mtp.decoding.cache.compact``).
        tree: the trees fed after the cache.
        n_valid: (b,) the position id of each row's root (its number of cached real tokens).
        dtype: the mask's float dtype (the model's).
        sliding_window: W when every attention layer attends to the last W positions only
            (query position - key position < W), as Hugging Face's sliding-window mask; None
            for full attention.

    Returns:
        0 where a node may attend, the dtype's lowest value elsewhere.
    """
    allowed_tree = ancestor_matrix(tree.parents)  # (b, N, N)
    n = tree.size
    allowed_prefix = prefix_mask[:, None, :].expand(-1, n, -1)  # (b, N, S)
    if sliding_window is not None:
        query_pos = n_valid[:, None] + tree.depth  # (b, N)
        # A real slot's position: the number of real slots before it (right-aligned rows).
        prefix_pos = prefix_mask.long().cumsum(-1) - 1  # (b, S)
        near = (query_pos[:, :, None] - prefix_pos[:, None, :]) < sliding_window
        allowed_prefix = allowed_prefix & near
        tree_near = (query_pos[:, :, None] - query_pos[:, None, :]) < sliding_window
        allowed_tree = allowed_tree & tree_near
    allowed = torch.cat([allowed_prefix, allowed_tree], dim=-1)  # (b, N, S + N)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclass
class TreePath:
    """The outcome of verifying a batch of trees.

    Attributes:
        nodes: (b, D + 1) node indices of each row's accepted path, root first, padded with the
            row's last accepted node; D = the deepest accepted depth in the batch.
        accepted: (b,) accepted drafts per row (the path has accepted + 1 nodes).
        next_token: (b,) the token that follows the path (correction or bonus).
        tried: (b, D_max) bool, whether the row's path reached depth j - 1 at a node with
            children (so depth j was verified); D_max = the trees' depth.
        unverified: (b, D) bool, whether the path's node at depth j + 1 was accepted against the
            verifier's choice (a lossy rule's; False past a row's path, always False when exact).
    """

    nodes: torch.Tensor
    accepted: torch.Tensor
    next_token: torch.Tensor
    tried: torch.Tensor
    unverified: torch.Tensor | None = None


def _children(tree: DraftTree) -> torch.Tensor:
    """(b, N, C) children of every node in index order, padded with -1; C = most children."""
    _b, n = tree.parents.shape
    is_child = (
        tree.parents[:, None, :] == torch.arange(n, device=tree.parents.device)[None, :, None]
    ) & tree.valid[:, None, :]
    counts = is_child.sum(-1)  # (b, N)
    width = max(int(counts.max()), 1)
    # Stable order of the child indices: sort the candidate indices with non-children last.
    key = torch.where(is_child, torch.arange(n, device=is_child.device), n)  # (b, N, N)
    order = key.sort(dim=-1).values[..., :width]
    return torch.where(order < n, order, -1)


def verify(
    tree: DraftTree, target: torch.Tensor, acceptable: torch.Tensor | None = None
) -> TreePath:
    """Follow the child whose token is the verifier's choice, the argmax of ``target``.

    Args:
        tree: the verified trees (N nodes per row).
        target: (b, N, V) scores; row u scores the token after node u's path: the model's
            scores when greedy, the warped log-probabilities plus the coupled noise of that
            output position when sampling (module docstring). Ties go to the first maximum.
        acceptable: (b, N) bool, the nodes a lossy rule accepts given their parent
            (``Acceptance.acceptable``); None: exactly the verifier's choices. The walk then
            takes, among acceptable children, the one on the longest acceptable path (ties: the
            first).

    Returns:
        The accepted paths and the choice after each (``TreePath``).
    """
    best = torch.argmax(target, dim=-1)  # (b, N) the verifier's token after each node
    b = tree.tokens.shape[0]
    batch = torch.arange(b, device=best.device)
    exact = tree.tokens == best.gather(1, tree.parents.clamp(min=0))
    match = tree.valid & (exact if acceptable is None else acceptable)
    match[:, 0] = True  # the root is always kept
    children = _children(tree)
    # The longest acceptable path below each node, deepest level first (lossy rules only:
    # under exact acceptance at most one child matches).
    reach = torch.zeros_like(tree.tokens)
    if acceptable is not None:
        parents = tree.parents.clamp(min=0)
        for level in range(int(tree.depth.max()), 0, -1):
            below = torch.where(match & (tree.depth == level), reach + 1, 0)
            reach.scatter_reduce_(1, parents, below, reduce="amax")
    current = torch.zeros(b, dtype=torch.long, device=best.device)
    done = torch.zeros(b, dtype=torch.bool, device=best.device)
    path = [current]
    tried = []
    max_depth = int(tree.depth.max())
    for _ in range(max_depth):
        kids = children[batch, current]  # (b, C)
        tried.append((kids >= 0).any(-1) & ~done)
        ok = (kids >= 0) & match.gather(1, kids.clamp(min=0)) & ~done[:, None]
        found = ok.any(-1)
        rank = torch.where(ok, reach.gather(1, kids.clamp(min=0)), -1)  # first longest
        step = kids.gather(1, rank.argmax(-1, keepdim=True)).squeeze(1)
        current = torch.where(found, step, current)
        done = done | ~found
        path.append(current)
    nodes = torch.stack(path, dim=1)  # (b, D_max + 1)
    accepted = tree.depth.gather(1, current[:, None]).squeeze(1)
    width = int(accepted.max()) + 1
    nodes = nodes[:, :width]
    on_path = torch.arange(1, width, device=best.device)[None] <= accepted[:, None]
    return TreePath(
        nodes=nodes,
        accepted=accepted,
        next_token=best.gather(1, current[:, None]).squeeze(1),
        tried=torch.stack(tried, dim=1) if tried else best.new_zeros(b, 0, dtype=torch.bool),
        unverified=~exact.gather(1, nodes[:, 1:]) & on_path,
    )
