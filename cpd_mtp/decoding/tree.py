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
targets of u's children are read at u. Verification (``verify_greedy``, ``verify_sampling``)
walks down from the root and returns the accepted path and the token that follows it:

- greedy: descend into the child whose token is the target's argmax (siblings are distinct,
  so at most one matches); the next token is the argmax at the last node;
- sampling: the children of a node are tried in turn with recursive rejection sampling
  (SpecInfer), each child against the distribution it was drawn from: a draw without
  replacement from the drafter's q (SpecTr, Sequoia), or a deterministic draft (q = one-hot:
  a context match). After every rejection the target p becomes normalise(max(0, p - q)), and
  the remaining draws' q loses the rejected token. When every child is rejected, the next token
  is drawn from what is left of p. Each emitted token is then distributed exactly as a draw
  from the verifier given the tokens before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DETERMINISTIC",
    "SAMPLED",
    "DraftTree",
    "TreePath",
    "ancestor_matrix",
    "chain_tree",
    "tree_attention_mask",
    "verify_greedy",
    "verify_sampling",
]

# How a node was drafted (``DraftTree.kind``): drawn without replacement from its parent's
# ``child_log_q`` (in sibling order), or proposed deterministically (q = one-hot).
SAMPLED, DETERMINISTIC = 0, 1


@dataclass
class DraftTree:
    """A batch of draft trees with N nodes per row (node 0: the root).

    Attributes:
        tokens: (b, N) int64 token of each node.
        parents: (b, N) int64 parent index, < the node's own; -1 for the root.
        depth: (b, N) int64 depth; 0 for the root.
        valid: (b, N) bool; False marks padding nodes of a row whose tree is smaller (their
            outputs are ignored and they are never accepted).
        kind: (b, N) int64 ``SAMPLED`` or ``DETERMINISTIC`` (read only when sampling).
        child_log_q: (b, N, V) the warped log q that node u's ``SAMPLED`` children were drawn
            from, without replacement in index order; None for greedy trees.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    kind: torch.Tensor
    child_log_q: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """N, nodes per row, the root included."""
        return self.tokens.shape[1]

    @property
    def is_chain(self) -> bool:
        """Whether every row is one chain: node j's parent is j - 1, every node valid."""
        n = self.size
        chain = torch.arange(-1, n - 1, device=self.parents.device)
        return bool((self.parents == chain).all()) and bool(self.valid.all())

    def select(self, rows: torch.Tensor) -> DraftTree:
        """The trees of the given rows."""
        return DraftTree(
            self.tokens[rows],
            self.parents[rows],
            self.depth[rows],
            self.valid[rows],
            self.kind[rows],
            None if self.child_log_q is None else self.child_log_q[rows],
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
        kind=torch.full((b, m + 1), SAMPLED, dtype=torch.long, device=device),
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
    """

    nodes: torch.Tensor
    accepted: torch.Tensor
    next_token: torch.Tensor
    tried: torch.Tensor


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


def verify_greedy(tree: DraftTree, target: torch.Tensor) -> TreePath:
    """Greedy verification: follow the child whose token is the target's argmax.

    Args:
        tree: the verified trees (N nodes per row).
        target: (b, N, V) scores; row u is the verifier's distribution after node u's path.

    Returns:
        The accepted paths and the argmax token after each (``TreePath``).
    """
    best = torch.argmax(target, dim=-1)  # (b, N) the verifier's token after each node
    b = tree.tokens.shape[0]
    batch = torch.arange(b, device=best.device)
    match = tree.valid & (tree.tokens == best.gather(1, tree.parents.clamp(min=0)))
    match[:, 0] = True  # the root is always kept
    children = _children(tree)
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
        step = kids.gather(1, ok.long().argmax(-1, keepdim=True)).squeeze(1)
        current = torch.where(found, step, current)
        done = done | ~found
        path.append(current)
    nodes = torch.stack(path, dim=1)  # (b, D_max + 1)
    accepted = tree.depth.gather(1, current[:, None]).squeeze(1)
    width = int(accepted.max()) + 1
    return TreePath(
        nodes=nodes[:, :width],
        accepted=accepted,
        next_token=best.gather(1, current[:, None]).squeeze(1),
        tried=torch.stack(tried, dim=1) if tried else best.new_zeros(b, 0, dtype=torch.bool),
    )


def verify_sampling(
    tree: DraftTree,
    target_log_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> TreePath:
    """Recursive rejection sampling down the trees (module docstring).

    Args:
        tree: the verified trees; ``child_log_q`` holds the distributions the ``SAMPLED``
            children were drawn from (without replacement, in index order).
        target_log_probs: (b, N, V) normalised (warped) log-probabilities of the verifier after
            each node's path.
        generator: random source.

    Returns:
        The accepted paths and the token drawn after each (``TreePath``).
    """
    from cpd_mtp.decoding.sampling import inverse_cdf

    if tree.child_log_q is None and bool((tree.kind[:, 1:] == SAMPLED).any()):
        raise ValueError("sampling verification needs the trees' child_log_q")
    b, _n = tree.tokens.shape
    device = tree.tokens.device
    batch = torch.arange(b, device=device)
    children = _children(tree)  # (b, N, C)
    current = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    path = [current]
    tried = []
    max_depth = int(tree.depth.max())
    p = target_log_probs[batch, current].exp().to(torch.float64)  # (b, V) residual target
    for _ in range(max_depth):
        kids = children[batch, current]  # (b, C)
        tried.append((kids >= 0).any(-1) & ~done)
        q = None
        if tree.child_log_q is not None:
            q = tree.child_log_q[batch, current].exp().to(torch.float64)  # (b, V)
        chosen = torch.full((b,), -1, dtype=torch.long, device=device)
        for j in range(kids.shape[1]):
            kid = kids[:, j]
            live = (kid >= 0) & (chosen < 0) & ~done
            if not bool(live.any()):
                break
            kid0 = kid.clamp(min=0)
            token = tree.tokens[batch, kid0]
            deterministic = tree.kind[batch, kid0] == DETERMINISTIC
            p_token = p.gather(1, token[:, None]).squeeze(1)
            if q is not None:
                q_token = q.gather(1, token[:, None]).squeeze(1)
            else:
                q_token = torch.ones_like(p_token)
            q_token = torch.where(deterministic, torch.ones_like(q_token), q_token)
            uniform = torch.rand(b, generator=generator, device=device, dtype=torch.float64)
            # u < p / q (q > 0 for a drawn token); p >= q always accepts.
            accept = live & (uniform * q_token < p_token)
            chosen = torch.where(accept, kid, chosen)
            reject = live & ~accept
            if bool(reject.any()):
                residual = (p - q).clamp(min=0) if q is not None else p.clone()
                # A deterministic draft's q is one-hot: the residual is p without its token.
                one_hot = torch.zeros_like(p).scatter_(1, token[:, None], 1.0)
                residual = torch.where(deterministic[:, None], (p - one_hot).clamp(min=0), residual)
                mass = residual.sum(-1, keepdim=True)
                # p == q up to rounding leaves no residual mass; rejection then had probability
                # ~0, and p itself is the right fallback.
                new_p = torch.where(mass > 0, residual / mass.clamp(min=1e-300), p)
                p = torch.where(reject[:, None], new_p, p)
                if q is not None:
                    # The next sampled sibling was drawn without the rejected token.
                    removed = q.scatter(1, token[:, None], 0.0)
                    removed_mass = removed.sum(-1, keepdim=True)
                    new_q = torch.where(
                        removed_mass > 0, removed / removed_mass.clamp(min=1e-300), q
                    )
                    q = torch.where((reject & ~deterministic)[:, None], new_q, q)
        moved = chosen >= 0
        current = torch.where(moved, chosen, current)
        path.append(current)
        # Rows that stopped keep their residual p for the final draw; rows that moved get the
        # verifier's full distribution at the new node.
        done = done | ~moved
        if bool(moved.any()):
            fresh = target_log_probs[batch, current].exp().to(torch.float64)
            p = torch.where(moved[:, None], fresh, p)
    next_token = inverse_cdf(p, generator)
    nodes = torch.stack(path, dim=1)
    accepted = tree.depth.gather(1, current[:, None]).squeeze(1)
    width = int(accepted.max()) + 1
    return TreePath(
        nodes=nodes[:, :width],
        accepted=accepted,
        next_token=next_token,
        tried=torch.stack(tried, dim=1)
        if tried
        else torch.zeros(b, 0, dtype=torch.bool, device=device),
    )
