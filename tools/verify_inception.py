"""Check metrics.InceptionV3 output for output against two reference FID networks,
given the same (random) weights: not a test (it needs other projects' code), a tool.

Ref A: pytorch-fid 0.3.0 (fid_inception_v3 and its InceptionV3 wrapper) on torchvision
       0.29.1's own models/inception.py (only its weights-enum/registry imports stubbed).
Ref B: torch-fidelity 0.4.0's feature_extractor_inceptionv3.py (pure torch; the package
       __init__ is bypassed), with its interpolate_compat_tensorflow.py.

Each of metrics.py's two image preparations is held to the reference that uses it, on uint8
images of 28x28, 32x32 (and 299x299), through metrics.extract as report() calls it:
  extract(convention="pytorch-fid")    (FID, precision/recall, memorization) vs Ref A on u8 / 255
                                       (what its ToTensor loader gives): torch's bilinear, 2x - 1;
  extract(convention="torch-fidelity") (IS, KID) vs Ref B's FeatureExtractorInceptionV3 on the same
                                       uint8: its TF1 bilinear resize, then (x - 128) / 128;
and resize_bilinear_tf1 alone vs Ref B's interpolate_bilinear_2d_like_tensorflow1x (6 size pairs).

Get the sources without installing anything (PyPI only):
    pip download --no-deps -d /tmp/pkgs pytorch-fid==0.3.0 torch-fidelity==0.4.0 torchvision==0.29.1
    cd /tmp/pkgs && unzip -q -o pytorch_fid-*.whl -d src && unzip -q -o torch_fidelity-*.whl -d src \
        && unzip -q -o torchvision-*.whl 'torchvision/models/inception.py' -d tv
Then, from the repository root: python tools/verify_inception.py   (CPU, about 30 s on 2 cores)
Last run (torch 2.13 CPU): pytorch-fid path: max|diff| 0 at 299x299; pool3 9.5e-7 at 64x64, 7.2e-7
at 28x28, 1.2e-6 at 32x32 (rounding: resizing in [0,1] then 2x-1 vs in [-1,1]; max|pool3| ~3.5).
torch-fidelity path: the resize bit-exact (0) on all 6 size pairs; pool3 0 (bit-exact) at 28x28,
32x32, 299x299 and for 1-channel input; logits_unbiased 4.5e-7, 5.2e-7, 7.5e-7 (ours are formed in
float64, its in float32: 2048-term dot products, 2048 * 2^-24 * ~1 ~ 1e-4 bound). Mutants at 28x28
vs torch-fidelity: torch's half-pixel resize 5.5e-2, x/127.5-1 9.7e-3, the pytorch-fid path 6.0e-2;
torchvision's pooling (count_include_pad, Mixed_7c avg) 0.34 and 2.0.
"""
import importlib.util
import os
import sys
import types

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_SRC = os.environ.get("REF_SRC", "/tmp/pkgs/src")
TV_SRC = os.environ.get("TV_SRC", "/tmp/pkgs/tv")


def load_file(modname, path):
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


import metrics as ours  # noqa: E402

# ---- Ref A: torchvision inception.py with stubbed registry/weights plumbing, then pytorch-fid ----------
class _WeightsEnum:
    @staticmethod
    def verify(w):
        assert w is None, "stub only supports weights=None"
        return w


tv = stub("torchvision", __version__="0.29.1", __path__=[])
tv.transforms = stub("torchvision.transforms", __path__=[])
stub("torchvision.transforms._presets", ImageClassification=object)
tv.utils = stub("torchvision.utils", _log_api_usage_once=lambda obj: None)
tv.models = stub("torchvision.models", __path__=[])
stub("torchvision.models._api", register_model=lambda *a, **k: (lambda f: f),
     Weights=lambda **kw: kw, WeightsEnum=_WeightsEnum)
stub("torchvision.models._meta", _IMAGENET_CATEGORIES=[str(i) for i in range(1000)])
stub("torchvision.models._utils", _ovewrite_named_param=lambda kw, k, v: kw.__setitem__(k, v),
     handle_legacy_interface=lambda **kw: (lambda f: f))
tv.models.inception = load_file("torchvision.models.inception",
                                os.path.join(TV_SRC, "torchvision/models/inception.py"))
tv.models.inception_v3 = tv.models.inception.inception_v3
pfid = load_file("pytorch_fid_inception", os.path.join(REF_SRC, "pytorch_fid/inception.py"))

# Build the reference graph exactly like pytorch-fid's fid_inception_v3(), but before its weight download.
ref = pfid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
for name, blk in [("Mixed_5b", pfid.FIDInceptionA(192, 32)), ("Mixed_5c", pfid.FIDInceptionA(256, 64)),
                  ("Mixed_5d", pfid.FIDInceptionA(288, 64)), ("Mixed_6b", pfid.FIDInceptionC(768, 128)),
                  ("Mixed_6c", pfid.FIDInceptionC(768, 160)), ("Mixed_6d", pfid.FIDInceptionC(768, 160)),
                  ("Mixed_6e", pfid.FIDInceptionC(768, 192)), ("Mixed_7b", pfid.FIDInceptionE_1(1280)),
                  ("Mixed_7c", pfid.FIDInceptionE_2(2048))]:
    setattr(ref, name, blk)

# Deterministic randomization of every parameter and BN buffer (fan-in scaled so activations stay O(1)).
g = torch.Generator().manual_seed(1234)
with torch.no_grad():
    for mname, m in ref.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            m.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=g)))
        elif isinstance(m, torch.nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
sd = ref.state_dict()

# Now run pytorch-fid's own fid_inception_v3() / InceptionV3 with the "download" returning our random dict.
pfid.load_state_dict_from_url = lambda *a, **k: {k_: v.clone() for k_, v in sd.items()}
ref_full = pfid.fid_inception_v3().eval()        # torchvision Inception3 forward -> 1008 logits
ref_pool3 = pfid.InceptionV3([3]).eval()         # FID wrapper: resize, 2x-1, blocks -> [B,2048,1,1]

# ---- Ours: strict load of the very same state dict (names match directly) -----------------------------
net = ours.InceptionV3()
net.load_state_dict(sd, strict=True)
assert set(sd) == set(net.state_dict()), "key sets differ"
n_nbt = sum(k.endswith("num_batches_tracked") for k in sd)

# BatchNorm tolerance check: a plain dict (no _metadata) without num_batches_tracked also loads strictly;
# with version-2 metadata attached, the missing keys are reported.
plain = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
ours.InceptionV3().load_state_dict(plain, strict=True)
with_meta = type(sd)(plain)
with_meta._metadata = sd._metadata
try:
    ours.InceptionV3().load_state_dict(with_meta, strict=True)
    meta_result = "loads"
except RuntimeError:
    meta_result = "fails (missing num_batches_tracked)"

torch.manual_seed(0)
report = []
with torch.no_grad():
    # (1) pytorch-fid path at 64x64 input. u in [0,1] on a 1/256 grid so that x = 2u-1 is exact.
    u = torch.randint(0, 257, (4, 3, 64, 64)).float() / 256
    x = 2 * u - 1
    p_ours, l_ours = net(x)
    p_ref = ref_pool3(u)[0].squeeze(-1).squeeze(-1)                    # resize in [0,1], then 2x-1
    l_ref = ref_full(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
    report.append(("pytorch-fid 64x64  pool3 (wrapper: resize then 2x-1)", (p_ours - p_ref).abs().max(), p_ref))
    report.append(("pytorch-fid 64x64  logits (Inception3, same resize)", (l_ours - l_ref).abs().max(), l_ref))
    # (2) pytorch-fid path at 299x299 (resize is the identity there).
    u = torch.randint(0, 257, (2, 3, 299, 299)).float() / 256
    x = 2 * u - 1
    p_ours, l_ours = net(x)
    report.append(("pytorch-fid 299x299 pool3", (p_ours - ref_pool3(u)[0].flatten(1)).abs().max(), p_ours))
    report.append(("pytorch-fid 299x299 logits", (l_ours - ref_full(x)).abs().max(), l_ours))
    # (2b) the path report() takes for FID: uint8 images through extract(convention="pytorch-fid"),
    # vs pytorch-fid on what its loader makes of them (ToTensor: u8 / 255), at non-299 sizes.
    for s in (28, 32):
        u8 = torch.randint(0, 256, (3, 3, s, s), dtype=torch.uint8)
        f_ours, lu_ours = ours.extract(net, u8, batch_size=3, desc="ours", convention="pytorch-fid")
        p_ref = ref_pool3(u8.float() / 255)[0].flatten(1).double()
        report.append((f"pytorch-fid {s}x{s} uint8 via extract: pool3", (f_ours - p_ref).abs().max(), p_ref))
        lu_ref = p_ref @ sd["fc.weight"].double().T
        report.append((f"pytorch-fid {s}x{s} uint8 via extract: logits - bias", (lu_ours - lu_ref).abs().max(), lu_ref))
    # (3) one-channel input == the same channel repeated 3x.
    g1 = x[:, :1]
    p1, l1 = net(g1)
    p3, l3 = net(g1.repeat(1, 3, 1, 1))
    report.append(("1-channel vs repeated 3-channel pool3", (p1 - p3).abs().max(), p3))

# ---- Ref B: torch-fidelity, package __init__ bypassed --------------------------------------------------
stub("torch_fidelity", __path__=[os.path.join(REF_SRC, "torch_fidelity")])
tfe = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
# torch-fidelity names == torchvision names (its extra MaxPool_1/MaxPool_2/AvgPool hold no parameters),
# so the mapping is the identity; spelled out to make that explicit:
mapping = {k: k for k in sd}
tfe.load_state_dict_from_url = lambda *a, **k: {mapping[k_]: v.clone() for k_, v in sd.items()}
fid_b = tfe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"])
with torch.no_grad():
    # uint8 input at 299x299 so torch-fidelity's TF1-style resize is the identity and both nets see the
    # same pixels: ours gets (u8-128)/128, which is exactly what torch-fidelity computes internally.
    u8 = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    p_b, lu_b, l_b = fid_b(u8)
    p_ours, l_ours = net((u8.float() - 128) / 128)
    report.append(("torch-fidelity 299x299 pool3 ('2048')", (p_ours - p_b).abs().max(), p_b))
    report.append(("torch-fidelity 299x299 logits", (l_ours - l_b).abs().max(), l_b))
    report.append(("torch-fidelity logits_unbiased + fc.bias vs ours", (l_ours - (lu_b + sd["fc.bias"])).abs().max(), l_b))

# ---- The torch-fidelity preparation (IS and KID): ours vs torch-fidelity, resize included -----------------
tf_interp = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
with torch.no_grad():
    # (4) the resize alone, against torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x (its 'slow',
    # the method its extractor uses), up and down, square and not, on uint8 values as in its extractor.
    worst = 0.0
    for (h, w), out in [((28, 28), (299, 299)), ((32, 32), (299, 299)), ((299, 299), (299, 299)),
                        ((3, 5), (7, 4)), ((500, 400), (299, 299)), ((64, 17), (299, 299))]:
        xf = torch.randint(0, 256, (2, 3, h, w)).float()
        d = ours.resize_bilinear_tf1(xf, out) - tf_interp.interpolate_bilinear_2d_like_tensorflow1x(
            xf, size=out, align_corners=False)
        worst = max(worst, d.abs().max().item())
    report.append(("resize_bilinear_tf1 vs torch-fidelity's, 6 size pairs", torch.tensor(worst), torch.tensor(255.0)))
    # (5) the whole path report() takes for IS and KID: uint8 through extract(convention="torch-fidelity")
    # vs torch-fidelity's FeatureExtractorInceptionV3 (its TF1 resize and (x-128)/128 inside) on the same
    # uint8 images, at non-299 sizes and at 299 (its resize the identity there).
    fidelity = {}
    for s in (28, 32, 299):
        u8 = torch.randint(0, 256, (3, 3, s, s), dtype=torch.uint8)
        p_b, lu_b, l_b = fid_b(u8)
        f_ours, lu_ours = ours.extract(net, u8, batch_size=3, desc="ours", convention="torch-fidelity")
        report.append((f"torch-fidelity {s}x{s} via extract: pool3 ('2048')", (f_ours - p_b).abs().max(), p_b))
        report.append((f"torch-fidelity {s}x{s} via extract: logits_unbiased", (lu_ours - lu_b).abs().max(), lu_b))
        fidelity[s] = u8, p_b
    # (6) gray: ours on 1 channel vs torch-fidelity on it repeated to RGB (its loader's convert("RGB")).
    u8 = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    p_b = fid_b(u8.repeat(1, 3, 1, 1))[0]
    f_ours, _ = ours.extract(net, u8, batch_size=2, desc="ours", convention="torch-fidelity")
    report.append(("torch-fidelity 28x28 1-channel via extract: pool3", (f_ours - p_b).abs().max(), p_b))
    # Sensitivity of (5) at 28x28: the other convention's pieces must show large differences.
    u8, p_b = fidelity[28]
    x = F.interpolate(u8.float(), size=(299, 299), mode="bilinear", align_corners=False)
    report.append(("MUTANT torch half-pixel resize, (x-128)/128", (net.trunk((x - 128) / 128)[0] - p_b).abs().max(), p_b))
    x = ours.resize_bilinear_tf1(u8.float(), (299, 299))
    report.append(("MUTANT TF1 resize, x/127.5-1", (net.trunk(x / 127.5 - 1)[0] - p_b).abs().max(), p_b))
    report.append(("MUTANT pytorch-fid path (extract default)",
                   (ours.extract(net, u8, batch_size=3, desc="ours")[0] - p_b).abs().max(), p_b))

# Sensitivity: the same comparison with the FID-specific quirks undone must show large differences.
with torch.no_grad():
    u8, p_b = fidelity[299]
    x = (u8.float() - 128) / 128
    tf_pool = ours._avg_pool_tf
    ours._avg_pool_tf = lambda t: F.avg_pool2d(t, 3, 1, 1)          # torchvision: count_include_pad=True
    report.append(("MUTANT count_include_pad=True vs torch-fidelity", (net(x)[0] - p_b).abs().max(), p_b))
    ours._avg_pool_tf = tf_pool
    net.Mixed_7c.pool = "avg"                                          # torchvision: avg pool in Mixed_7c
    report.append(("MUTANT Mixed_7c avg pool vs torch-fidelity", (net(x)[0] - p_b).abs().max(), p_b))
    net.Mixed_7c.pool = "max"

print(f"state dict: {len(sd)} keys ({n_nbt} num_batches_tracked); strict load into ours OK")
print(f"strict load without num_batches_tracked: plain dict loads; with version-2 _metadata {meta_result}")
for name, d, ref_t in report:
    print(f"{name:55s} max|diff| = {d.item():.3e}   (max|ref| = {ref_t.abs().max().item():.3e})")
