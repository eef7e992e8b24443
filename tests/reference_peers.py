"""Literal per-image peers, written from their official code line by line, for the tests.

Deliberately independent of ``ratta.peers``: one image at a time, the official data
structures (dicts of lists for the TDA/BoostAdapter caches, zero-filled slot tensors for DMN's
memory) and formulas, in torch (float64 in the tests). The differences from the official
code are the ones ratta documents: features in, not images; the logit scale s instead of a
hard-coded 100; stable sorts where the official order of equal entropies is unspecified;
ZERO's intended tie-break fallback.
"""

from __future__ import annotations

import copy
import math
import operator

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- ZERO
# FarinaMatteo/zero @c609f7c: ttas/zero.py (Zero.zero), ttas/base.py, utils/tools.py


def zero_image(views, z_txt, scale, gamma=0.3, zero_temp=2.0**-10):
    """ZERO on one image's inputs [N, d]; returns p_bar [C]."""
    temp = 1 / scale
    l = views @ z_txt.t()  # noqa: E741 - the official name
    p = (l / temp).softmax(1)
    batch_entropy = -(p * p.log()).sum(1)
    full_idx = torch.argsort(batch_entropy, descending=False, stable=True)
    filt_idx = full_idx[: int(batch_entropy.size()[0] * gamma)]
    l_filt = l[filt_idx]
    if zero_temp > 0:
        p_bar = (l_filt / zero_temp).float().softmax(1).sum(0).to(l.dtype)  # autocast: fp32
    else:
        p_bar = F.one_hot(l_filt.argmax(1), l.shape[1]).to(l.dtype).sum(0)
    max_counts, scalar_pred = torch.max(p_bar, dim=-1)
    ties = [scalar_pred]
    for i in range(len(p_bar)):
        if i == scalar_pred:
            continue
        if p_bar[i] == max_counts:
            ties.append(i)
    if len(ties) > 1:
        k = int(views.size(0) * gamma)
        sorted_l = l[full_idx]
        scalar_pred = greedy_break(ties, sorted_l[k:], sorted_l[0])
        p_bar[scalar_pred] += 1
    return p_bar


def greedy_break(ties, logits, first):
    ties_tensor = torch.tensor(ties, dtype=torch.int)
    preds = torch.argmax(logits, dim=1)
    for pred in preds:
        if pred in ties_tensor:
            return pred
    # the intended fallback (the official masks logit[~ties], the wrong classes)
    logit = (logits[0] if logits.shape[0] else first).clone()
    keep = torch.zeros_like(logit, dtype=torch.bool)
    keep[torch.tensor([int(t) for t in ties])] = True
    logit[~keep] = -torch.inf
    return torch.argmax(logit, dim=-1)


# --------------------------------------------------------------------------- MTA
# MaxZanella/MTA @cafafdf: mta.py (solve_mta)


def gaussian_kernel(mu, bandwidth, datapoints):
    dist = torch.norm(datapoints - mu, dim=-1, p=2)
    density = torch.exp(-(dist**2) / (2 * bandwidth**2))
    return density


def mta_image(image_features, text_features, logit_scale, lambda_y=0.2, lambda_q=4):
    """MTA on one image's inputs [N, d]; returns the logits [C]."""
    logits = image_features @ text_features.t() * logit_scale
    max_iter = 5
    temperature = 1
    batch_size = image_features.shape[0]
    dist = torch.cdist(image_features, image_features)
    sorted_dist, _ = torch.sort(dist, dim=1)
    k = int(0.3 * (image_features.shape[0] - 1))
    selected_distances = sorted_dist[:, 1 : k + 1] ** 2
    mean_distance = torch.mean(selected_distances, dim=1)
    bandwidth = torch.sqrt(0.5 * mean_distance)
    affinity_matrix = (logits / temperature).softmax(1) @ (logits / temperature).softmax(1).t()
    y = torch.ones(batch_size, dtype=image_features.dtype) / batch_size
    mode = image_features[0]
    convergence = False
    th = 1e-6
    it = 0
    while not convergence:
        density = gaussian_kernel(mode, bandwidth, image_features)
        convergence_inlierness = False
        i = 0
        while not convergence_inlierness:
            i += 1
            old_y = y
            weighted_affinity = affinity_matrix * y.unsqueeze(0)
            y = F.softmax(
                1 / lambda_y * (density + lambda_q * torch.sum(weighted_affinity, dim=1)), dim=-1
            )
            if torch.norm(old_y - y) < th or i >= max_iter:
                convergence_inlierness = True
        convergence_mode = False
        i = 0
        while not convergence_mode:
            i += 1
            old_mode = mode
            density = gaussian_kernel(mode, bandwidth, image_features)
            weighted_density = density * y
            mode = torch.sum(weighted_density.unsqueeze(1) * image_features, dim=0) / torch.sum(
                weighted_density
            )
            mode = mode / mode.norm(p=2, dim=-1)
            if torch.norm(old_mode - mode) < th or i >= max_iter:
                convergence_mode = True
        it += 1
        if it >= max_iter:
            convergence = True
    return (mode.unsqueeze(0) @ text_features.t() * logit_scale)[0]


# --------------------------------------------------------------------------- TDA
# kdiAAA/TDA @e697fb0: tda_runner.py (update_cache, compute_cache_logits, run_test_tda), utils.py


def get_entropy(loss, clip_weights):
    max_entropy = math.log2(clip_weights.size(1))
    return float(loss / max_entropy)


def softmax_entropy(x):
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def avg_entropy(outputs):
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - np.log(logits.shape[0])
    min_real = torch.finfo(avg_logits.dtype).min
    avg_logits = torch.clamp(avg_logits, min=min_real)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def get_clip_logits(image_features, clip_weights, scale):
    """utils.get_clip_logits from the encoded (normalised) features [n, d]."""
    clip_logits = scale * image_features @ clip_weights
    if image_features.size(0) > 1:
        batch_entropy = softmax_entropy(clip_logits)
        selected_idx = torch.argsort(batch_entropy, descending=False, stable=True)[
            : int(batch_entropy.size()[0] * 0.1)
        ]
        output = clip_logits[selected_idx]
        image_features = image_features[selected_idx].mean(0).unsqueeze(0)
        clip_logits = output.mean(0).unsqueeze(0)
        loss = avg_entropy(output)
        prob_map = output.softmax(1).mean(0).unsqueeze(0)
        pred = int(output.mean(0).unsqueeze(0).topk(1, 1, True, True)[1].t())
    else:
        loss = softmax_entropy(clip_logits)
        prob_map = clip_logits.softmax(1)
        pred = int(clip_logits.topk(1, 1, True, True)[1].t()[0])
    return image_features, clip_logits, loss, prob_map, pred


def update_cache(cache, pred, features_loss, shot_capacity, include_prob_map=False):
    item = features_loss if not include_prob_map else [*features_loss[:2], features_loss[2]]
    if pred in cache:
        if len(cache[pred]) < shot_capacity:
            cache[pred].append(item)
        elif features_loss[1] < cache[pred][-1][1]:
            cache[pred][-1] = item
        cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
    else:
        cache[pred] = [item]


def compute_cache_logits(image_features, cache, alpha, beta, clip_weights, neg_mask=None):
    cache_keys = []
    cache_values = []
    for class_index in sorted(cache.keys()):
        for item in cache[class_index]:
            cache_keys.append(item[0])
            if neg_mask:
                cache_values.append(item[2])
            else:
                cache_values.append(class_index)
    if len(cache_keys) == 0:
        return torch.zeros(1, dtype=image_features.dtype)[0]
    cache_keys = torch.cat(cache_keys, dim=0).permute(1, 0)
    if neg_mask:
        cache_values = torch.cat(cache_values, dim=0)
        cache_values = ((cache_values > neg_mask[0]) & (cache_values < neg_mask[1])).to(
            image_features.dtype
        )
    else:
        cache_values = F.one_hot(
            torch.tensor(cache_values).to(torch.int64), num_classes=clip_weights.size(1)
        ).to(image_features.dtype)
    affinity = image_features @ cache_keys
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
    return alpha * cache_logits


NEG = {"alpha": 0.117, "beta": 1.0, "shot_capacity": 2, "lower": 0.2, "upper": 0.5}


def tda_stream(stream, clip_weights, scale, alpha, beta, neg_enabled=True, capacity=3):
    """run_test_tda over inputs in stream order (each [n, d]: one crop, or z_0 + views)."""
    pos_cache, neg_cache, out = {}, {}, []
    for images in stream:
        image_features, clip_logits, loss, prob_map, pred = get_clip_logits(
            images, clip_weights, scale
        )
        prop_entropy = get_entropy(loss, clip_weights)
        update_cache(pos_cache, pred, [image_features, loss], capacity)
        if neg_enabled and NEG["lower"] < prop_entropy < NEG["upper"]:
            update_cache(
                neg_cache, pred, [image_features, loss, prob_map], NEG["shot_capacity"], True
            )
        final_logits = clip_logits.clone()
        if pos_cache:
            final_logits += compute_cache_logits(
                image_features, pos_cache, alpha, beta, clip_weights
            )
        if neg_enabled and neg_cache:
            final_logits -= compute_cache_logits(
                image_features, neg_cache, NEG["alpha"], NEG["beta"], clip_weights, (0.03, 1.0)
            )
        out.append(final_logits[0])
    return torch.stack(out)


# --------------------------------------------------------------------------- BoostAdapter
# taolinzhang/BoostAdapter @9983e1a: runner.py (update_cache, run_test_tda), utils.py


def boost_update_cache(
    cache, pred, features_loss, shot_capacity, include_prob_map=False, fifo=True
):
    item = features_loss if not include_prob_map else [*features_loss[:2], features_loss[2]]
    if pred in cache:
        cache[pred].append(item)
        if fifo:
            if len(cache[pred]) > shot_capacity:
                cache[pred] = cache[pred][1:]
        else:
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
            cache[pred] = cache[pred][:shot_capacity]
    else:
        cache[pred] = [item]


def get_output_entropy(outputs):
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    return -(logits * torch.exp(logits)).sum(dim=-1)


def select_confident_samples(feat, logits, top):
    batch_entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    idx = torch.argsort(batch_entropy, descending=False, stable=True)[
        : int(batch_entropy.size()[0] * top)
    ]
    return feat[idx], logits[idx], idx


def boost_stream(stream, clip_weights, scale, alpha, beta, delta, infer_ori_image=True):
    """run_test_tda in "boostadapter" mode over inputs [n, d] (z_0 first) in stream order."""
    pos_cache, neg_cache, out = {}, {}, []
    for images in stream:
        ori_feat = images
        ori_output = scale * images @ clip_weights
        if infer_ori_image:
            clip_logits = ori_output[:1]
            image_features = images[:1]
            loss = softmax_entropy(clip_logits)
            prob_map = clip_logits.softmax(1)
            pred = int(clip_logits.topk(1, 1, True, True)[1].t()[0])
        else:
            image_features, clip_logits, loss, prob_map, pred = get_clip_logits(
                images, clip_weights, scale
            )
        prop_entropy = get_entropy(loss, clip_weights)
        boost_update_cache(pos_cache, pred, [image_features, loss], 3, fifo=False)
        select_feat, select_output, _ = select_confident_samples(ori_feat, ori_output, 0.1)
        select_entropy = get_output_entropy(select_output)
        cur_pos_cache = copy.deepcopy(pos_cache)
        for i in range(select_entropy.shape[0]):
            cur_pred = int(select_output[i].argmax(dim=-1).item())
            cur_feat = select_feat[i]
            boost_update_cache(
                cur_pos_cache,
                cur_pred,
                [cur_feat.unsqueeze(0), select_entropy[i].item()],
                3 + delta,
                fifo=False,
            )
        if NEG["lower"] < prop_entropy < NEG["upper"]:
            boost_update_cache(
                neg_cache, pred, [image_features, loss, prob_map], NEG["shot_capacity"], True
            )
        final_logits = clip_logits.clone()
        if pos_cache:
            final_logits += compute_cache_logits(
                image_features, cur_pos_cache, alpha, beta, clip_weights
            )
        if neg_cache:
            final_logits -= compute_cache_logits(
                image_features, neg_cache, NEG["alpha"], NEG["beta"], clip_weights, (0.03, 1.0)
            )
        out.append(final_logits[0])
    return torch.stack(out)


# --------------------------------------------------------------------------- DMN-ZS
# YBZh/DMN @c6c218c: dmn_main.py (select_confident_samples, DualMem.update_memory_bank,
# DualMem.get_image_pred "similarity_weighted", direct_inference), clip/fix_clip.py


class DMNModel:
    """The state DMN keeps on its model object: text features and the zero-filled memory."""

    def __init__(self, text_feat, scale, memory_size=50):
        self.text_feat = text_feat / text_feat.norm(dim=1, keepdim=True)
        self.logit_scale = scale
        n_cls, d = self.text_feat.shape
        self.memory_size = memory_size
        self.fixed_global_feat_vanilla = self.text_feat.clone().unsqueeze(1)
        self.image_feature_memory = torch.zeros(n_cls, memory_size, d, dtype=text_feat.dtype)
        self.image_entropy_mem = torch.zeros(n_cls, memory_size, dtype=text_feat.dtype)
        self.image_feature_count = torch.zeros(n_cls, 1).long()


def dmn_select_confident_samples(prob, top):
    batch_entropy = -(prob * torch.log(prob + 1e-6)).sum(1)
    idx = torch.argsort(batch_entropy, descending=False, stable=True)[
        : int(batch_entropy.size()[0] * top)
    ]
    return prob[idx], idx


def update_memory_bank(model, init_pred, image_features_global):
    mean_prob = init_pred[0]
    _, indice = mean_prob.max(0)
    pseudo_label = indice.item()
    selected_image_features_global = image_features_global[:1]
    current_instance_entropy = -(mean_prob * (torch.log(mean_prob + 1e-8))).sum()
    if model.image_feature_count[pseudo_label] == model.memory_size:
        if (current_instance_entropy < model.image_entropy_mem[pseudo_label]).sum() == 0:
            pass
        else:
            _, indice = torch.sort(model.image_entropy_mem[pseudo_label], stable=True)
            to_replace_indice = indice[-1]
            model.image_feature_memory[pseudo_label][to_replace_indice] = (
                selected_image_features_global
            )
            model.image_entropy_mem[pseudo_label][to_replace_indice] = current_instance_entropy
    else:
        count = model.image_feature_count[pseudo_label, 0].item()
        model.image_feature_memory[pseudo_label][count] = selected_image_features_global
        model.image_entropy_mem[pseudo_label][count] = current_instance_entropy
        model.image_feature_count[pseudo_label] += 1


def get_image_pred(model, image_features_global, beta=5.5):
    img_feat = image_features_global[:1]
    memorized_image_feat = torch.cat(
        (model.image_feature_memory, model.fixed_global_feat_vanilla), dim=1
    )
    img_feat_mappling = img_feat
    memorized_image_feat_K = memorized_image_feat / memorized_image_feat.norm(dim=-1, keepdim=True)
    memorized_image_feat_K[memorized_image_feat.sum(-1) == 0] = 0
    memorized_image_feat_V = memorized_image_feat / memorized_image_feat.norm(dim=-1, keepdim=True)
    memorized_image_feat_V[memorized_image_feat.sum(-1) == 0] = 0
    img_feat_mappling = img_feat_mappling / img_feat_mappling.norm(dim=-1, keepdim=True)
    similarity_matrix = (img_feat_mappling * memorized_image_feat_K).sum(-1)
    similarity_matrix = torch.exp(-beta * (-similarity_matrix + 1))
    adaptive_image_feat = (memorized_image_feat_V * similarity_matrix.unsqueeze(-1)).sum(1)
    adaptive_image_feat = adaptive_image_feat / adaptive_image_feat.norm(dim=-1, keepdim=True)
    adaptive_image_feat = adaptive_image_feat / adaptive_image_feat.norm(dim=-1, keepdim=True)
    logits = model.logit_scale * adaptive_image_feat @ img_feat.unsqueeze(-1)
    logits = logits[:, :, 0]
    return logits.softmax(dim=1)


def dmn_stream(stream, text_feat, scale, gamma=1.0, memory_size=50, selection_p=0.1):
    """direct_inference (zero-shot, n_shot 0) over inputs [32, d] (z_0 first) in stream order.

    Returns pred_vanilla + gamma * pred_global per image, as the weight search combines them.
    """
    model = DMNModel(text_feat, scale, memory_size)
    out = []
    for images in stream:
        image_features_global = images
        img_text = (model.logit_scale * image_features_global @ model.text_feat.t()).softmax(-1)
        img_text_pred = img_text[:1]
        confidence_prediction, _ = dmn_select_confident_samples(img_text, selection_p)
        init_pred = confidence_prediction.mean(0, keepdim=True)
        update_memory_bank(model, init_pred, image_features_global)
        img_global_pred = get_image_pred(model, image_features_global)
        out.append((img_text_pred + gamma * img_global_pred)[0])
    return torch.stack(out)
