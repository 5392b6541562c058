"""Evaluate a model: MPJPE, PA-MPJPE and MPVE in millimetres, by named protocol.

    python evaluate.py --ckpt runs/quickstart/last.pt --data data/synth/test.npz
    python evaluate.py --model fastmetro --preset L-H64 --weights FastMETRO-L-H64_h36m_state_dict.bin \
        --data h36m_valid_protocol2.npz --img-root /data/h36m --body SMPL_NEUTRAL.pkl \
        --h36m-regressor J_regressor_h36m_correct.npy --mesh-hierarchy mesh_downsampling.npz

The model comes from a train.py checkpoint (--ckpt; its body model, hierarchy and config are
stored in it and checked) or from a released state dict in the official key layout (--weights with
--model and --preset; read with weights_only=True, converted, loaded strictly). With the real SMPL
body, released weights need GraphCMR's `mesh_downsampling.npz` (--mesh-hierarchy): they were
trained on it, and the decimated hierarchy this project builds otherwise has the same sizes.

Protocols (--protocol; metrics.py implements them and says how):
- fastmetro (default): METRO / FastMETRO / TORE evaluation. MPJPE on the 14 LSP joints from the
  H36M regressor, pelvis-centred and then re-centred on the hip midpoint (LSP 2, 3) on both sides;
  PA-MPJPE per sample; MPVE of the pelvis-centred meshes. Reproduces FastMETRO (ECCV 2022)
  Tables 2-3 (Human3.6M protocol 2 MPJPE / PA-MPJPE; 3DPW MPVE / MPJPE / PA-MPJPE) and TORE
  (ICCV 2023) Tables 2-5 (the same metrics on the same sets), on METRO's TSVs or SPIN npz files.
- spin: SPIN's eval.py (ICCV 2019; also GraphCMR's tables). Prediction centred on the regressed
  pelvis against root-centred ground truth; for 3DPW the GT joints come from the (gendered, with
  --body-male/--body-female) GT mesh. Not comparable with the fastmetro numbers.
Give the H36M regressor that goes with the protocol's joint map; either released file works: its
ordering is detected on the body template (SPIN's J_regressor_h36m.npy has the leg rows swapped
relative to J_regressor_h36m_correct.npy and is reordered; a file that fits neither is refused).
Evaluation crops are the official integer-box crops (data.py), decoded at full resolution.

The results JSON (next to the checkpoint/weights, or --out) records the protocol, the model's
source, the regressor file's sha256 and ordering, and the mesh hierarchy (source, file, hash).
"""
import argparse
import json
from pathlib import Path

import torch

import checkpoints
import data as data_lib
from metrics import (DEFAULT_PROTOCOL, H36M_TO_LSP, J24_PELVIS, J24_TO_LSP, LSP_NAMES, PROTOCOLS,  # noqa: F401
                     MetricAccumulator, centre, evaluate, ground_truth, joint_errors, json_safe,
                     mean_pose_baseline, mpjpe, pa_mpjpe, predicted, print_table, protocol_centre,
                     similarity_procrustes)


def make_eval_loader(spec, img_root, input_size, batch_size, workers):
    ds = data_lib.open_dataset(spec, img_root=img_root, train=False, input_size=input_size)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=data_lib.collate, persistent_workers=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoints.add_model_args(p)
    p.add_argument("--data", required=True, help="dataset spec (npz or TSV yaml), as train.py --val")
    p.add_argument("--img-root", default=None, help="image root for npz datasets")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=PROTOCOLS)
    p.add_argument("--baseline-data", default=None, help="training set for the mean-pose baseline")
    p.add_argument("--body-male", default=None, help="male SMPL .pkl for gendered GT meshes (spin, 3DPW)")
    p.add_argument("--body-female", default=None, help="female SMPL .pkl for gendered GT meshes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results JSON (default: next to the checkpoint/weights)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    model, body_model, info = checkpoints.load_for_inference(
        device, ckpt=args.ckpt, weights=args.weights, model=args.model, preset=args.preset, body=args.body,
        h36m_regressor=args.h36m_regressor, mesh_hierarchy=args.mesh_hierarchy,
        overrides=checkpoints.parse_overrides(args.set))
    gendered = None
    if args.body_male or args.body_female:
        if not (args.body_male and args.body_female):
            raise ValueError("--body-male and --body-female go together")
        gendered = {1: checkpoints.build_body(args.body_male, body_model.h36m_regressor_path, "male").to(device),
                    2: checkpoints.build_body(args.body_female, body_model.h36m_regressor_path, "female").to(device)}
    loader = make_eval_loader(args.data, args.img_root, model.cfg.input_size, args.batch_size, args.workers)
    baseline = None
    if args.baseline_data:
        bl = make_eval_loader(args.baseline_data, args.img_root, model.cfg.input_size,
                              args.batch_size, args.workers)
        baseline = mean_pose_baseline(bl, body_model, device, args.protocol)
    res = evaluate(model, loader, body_model, device, args.protocol, max_batches=args.max_batches,
                   baseline=baseline, gendered=gendered)
    res.update(data=args.data, source=info, gt_mesh="gendered" if gendered else "neutral",
               h36m_regressor=info["h36m_regressor"], mesh_hierarchy=info["mesh_hierarchy"])
    if baseline is not None and res["model"] is not None:
        res["mpjpe_over_baseline"] = res["model"]["mpjpe"] / res["mean_pose_baseline"]["mpjpe"]
    print_table(res)
    src = Path(args.ckpt or args.weights)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}.{args.protocol}.eval.json")
    out.write_text(json.dumps(json_safe(res), indent=2, default=str))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
