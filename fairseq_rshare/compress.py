"""The math of fairseq-rshare-compress: a random-shared table fitted to a trained dense one.

Word w's vector is K sub-vectors; slot (w, k) reads pool entry ``mapping[w, k]``, times
``scales[w, k]`` with word scales.  For a dense V x H table D and a fixed mapping, the pool (and
scales) minimising ||D - D_hat||_F are:
- without scales, in closed form: each entry is the mean of the dense sub-vectors of its slots;
- with scales, by alternating exact minimisations (so the error never rises): the scales given
  the pool, s[w, k] = <d_wk, p> / <p, p>; the pool given the scales, p_j = sum s d / sum s^2.
A learned mapping assigns slots by k-means of the dense sub-vectors, each block of positions
that share entries (see mapping.PoolLayout) apart.  Balanced,
every entry gets floor or ceil of the average number of slots, as the random mapping gives.
"""
import torch

# Points whose distances to every centroid are computed at once (a 4096 x C block).
DISTANCE_ROWS = 4096


def sub_vectors(dense, num_subvectors):
    """The V*K dense sub-vectors, slot (w, k) at row w*K + k."""
    return dense.reshape(len(dense) * num_subvectors, -1)


def reconstruct(pool, mapping, scales=None):
    """The V x H table that a pool, mapping and scales stand for."""
    vectors = pool[mapping]
    if scales is not None:
        vectors = vectors * scales.unsqueeze(-1).to(vectors.dtype)
    return vectors.flatten(1)


def relative_error(dense, approximation, rows=None):
    """||D - D_hat||_F / ||D||_F over the rows that count (a bool V mask; default all)."""
    if rows is not None:
        dense, approximation = dense[rows], approximation[rows]
    dense = dense.double()
    return float(torch.linalg.norm(dense - approximation.double()) / torch.linalg.norm(dense))


def pool_given_scales(slots, entries, slot_weights, scales, pool):
    """The least-squares pool for fixed scales; entries no weighted slot reads keep their value."""
    numerator = torch.zeros_like(pool).index_add_(0, entries, slots * (slot_weights * scales).unsqueeze(1))
    denominator = torch.zeros(len(pool), dtype=pool.dtype).index_add_(0, entries, slot_weights * scales**2)
    read = denominator > 0
    pool = pool.clone()
    pool[read] = numerator[read] / denominator[read].unsqueeze(1)
    return pool


def scales_given_pool(slots, entries, pool, scales):
    """The least-squares scale of each slot for a fixed pool (a slot reading a zero entry keeps its scale)."""
    read = pool[entries]
    norms = (read * read).sum(1)
    return torch.where(norms > 0, (slots * read).sum(1) / norms.clamp_min(torch.finfo(norms.dtype).tiny), scales)


def fit_pool(dense, mapping, pool_size, word_scale=False, iterations=10, rows=None, initial_pool=None):
    """(pool, scales) minimising ||D - D_hat||_F over `rows` (a bool V mask, default all) for
    the V x K `mapping`; scales (V x K) only with `word_scale`, after `iterations` alternations,
    else None.  Entries that no counted slot reads keep `initial_pool` (default zeros)."""
    V, K = mapping.shape
    slots = sub_vectors(dense.double(), K)
    entries = mapping.reshape(-1).long()
    row_weights = torch.ones(V, dtype=torch.float64) if rows is None else rows.double()
    slot_weights = row_weights.repeat_interleave(K)
    pool = (torch.zeros(pool_size, slots.shape[1], dtype=torch.float64) if initial_pool is None
            else initial_pool.double())
    scales = torch.ones(V * K, dtype=torch.float64)
    pool = pool_given_scales(slots, entries, slot_weights, scales, pool)
    if not word_scale:
        return pool, None
    for _ in range(iterations):
        scales = scales_given_pool(slots, entries, pool, scales)
        pool = pool_given_scales(slots, entries, slot_weights, scales, pool)
    return pool, scales.reshape(V, K)


def nearest_centroids(points, centroids, excluded=None):
    """(index, squared distance) of each point's nearest centroid, never one of `excluded`
    (a bool mask over the centroids), computed DISTANCE_ROWS points at a time."""
    centroid_norms = (centroids * centroids).sum(1)
    if excluded is not None:
        centroid_norms = centroid_norms.masked_fill(excluded, float("inf"))
    indices, distances = [], []
    for block in points.split(DISTANCE_ROWS):
        partial = torch.addmm(centroid_norms, block, centroids.t(), alpha=-2)
        distance, index = partial.min(1)
        indices.append(index)
        distances.append((distance + (block * block).sum(1)).clamp_min(0))
    return torch.cat(indices), torch.cat(distances)


def kmeans_plus_plus(points, clusters, generator):
    """Initial centroids: k-means++ seeding (each next one drawn with probability proportional
    to its squared distance from those chosen), deterministic for a seeded generator."""
    norms = (points * points).sum(1)
    draws = torch.rand(clusters, generator=generator, dtype=torch.float64)
    chosen = []
    closest = None
    for draw in draws:
        cumulative = None if closest is None else closest.double().cumsum(0)
        if cumulative is not None and cumulative[-1] > 0:
            index = int(torch.searchsorted(cumulative, draw * cumulative[-1], right=True))
        else:  # the first, or fewer distinct points than clusters: any point
            index = int(draw * len(points))
        index = min(index, len(points) - 1)
        chosen.append(index)
        distance = (norms - 2 * (points @ points[index]) + norms[index]).clamp_min(0)
        closest = distance if closest is None else torch.minimum(closest, distance)
    return points[chosen].clone()


def cluster_means(points, assignment, centroids):
    """Each cluster's mean (an empty cluster keeps its centroid)."""
    counts = torch.bincount(assignment, minlength=len(centroids))
    sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
    means = centroids.clone()
    filled = counts > 0
    means[filled] = sums[filled] / counts[filled].unsqueeze(1).to(points.dtype)
    return means


def reseed_empty(points, assignment, centroids, distances):
    """Centroids where each empty cluster takes one of the points farthest from their centroids."""
    empty = (torch.bincount(assignment, minlength=len(centroids)) == 0).nonzero().flatten()
    if not len(empty):
        return centroids
    centroids = centroids.clone()
    centroids[empty] = points[distances.argsort(descending=True)[: len(empty)]]
    return centroids


def balanced_assignment(points, centroids):
    """Each point to a near centroid, every centroid taking floor or ceil of N/C points.

    Greedy, in rounds: every unplaced point proposes to its nearest centroid with room left,
    and each centroid takes its nearest proposers while its room lasts.  Only N mod C centroids
    may end with the ceiling: when more would reach it in one round, the lowest-numbered keep it.
    """
    N, C = len(points), len(centroids)
    floor, extra = divmod(N, C)
    capacity = torch.full((C,), floor + (1 if extra else 0))
    counts = torch.zeros(C, dtype=torch.long)
    assignment = torch.full((N,), -1, dtype=torch.long)
    unplaced = torch.arange(N)
    while len(unplaced):
        at_ceiling = int((counts == floor + 1).sum()) if extra else 0
        if extra and at_ceiling == extra:
            capacity.fill_(floor)
        choice, distance = nearest_centroids(points[unplaced], centroids, excluded=counts >= capacity)
        proposals = torch.bincount(choice, minlength=C)
        if extra and at_ceiling < extra:
            filling = (counts <= floor) & (counts + proposals >= floor + 1)  # not those already full
            reaching = ((capacity == floor + 1) & filling).nonzero().flatten()
            capacity[reaching[extra - at_ceiling:]] = floor
        order = distance.argsort(stable=True)
        order = order[choice[order].argsort(stable=True)]  # by centroid, nearest first
        chosen = choice[order]
        rank = torch.arange(len(order)) - (torch.cumsum(proposals, 0) - proposals)[chosen]
        accepted = rank < (capacity - counts)[chosen]
        assignment[unplaced[order[accepted]]] = chosen[accepted]
        counts += torch.bincount(chosen[accepted], minlength=C)
        unplaced = unplaced[order[~accepted]]
    return assignment


def kmeans(points, clusters, iterations=30, seed=0, balanced=False):
    """(centroids, assignment) of Lloyd's k-means from k-means++ seeding, at most `iterations`
    rounds (fewer once the assignment stops changing); the centroids are the means of the
    clusters.  Balanced: then as many rounds of balanced_assignment from those centroids."""
    points = points.float()
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(points, clusters, generator)
    assignment = None
    for _ in range(iterations):
        nearest, distances = nearest_centroids(points, centroids)
        if assignment is not None and torch.equal(nearest, assignment):
            break
        assignment = nearest
        centroids = reseed_empty(points, assignment, cluster_means(points, assignment, centroids), distances)
    if balanced:
        assignment = None
        for _ in range(iterations):
            placed = balanced_assignment(points, centroids)
            if assignment is not None and torch.equal(placed, assignment):
                break
            assignment = placed
            centroids = cluster_means(points, assignment, centroids)
    return centroids, assignment


def learned_mapping(dense, layout, balanced=False, iterations=30, seed=0):
    """(mapping, centroids): the V x K mapping k-means gives a dense V x H table, and the M
    cluster centroids (a pool).  Each block of the PoolLayout `layout` (positions sharing
    entries) is clustered apart, its i-th with seed + i: for per-position pools, position k's V
    sub-vectors into its M/K entries; for a global pool, all V*K into M."""
    V, K, M = len(dense), layout.num_subvectors, layout.pool_size
    slots = sub_vectors(dense.float(), K).reshape(V, K, -1)
    mapping = torch.empty(V, K, dtype=torch.long)
    pool = torch.empty(M, slots.shape[2])
    for index, (positions, first, entries) in enumerate(layout.blocks()):
        points = slots[:, positions].reshape(V * len(positions), -1)
        centroids, assignment = kmeans(points, entries, iterations, seed + index, balanced)
        mapping[:, positions] = first + assignment.reshape(V, len(positions))
        pool[first:first + entries] = centroids
    return mapping, pool
