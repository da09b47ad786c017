"""Post-processing modes on both-hip MR phantoms: DSC / precision / recall of none, lcc, lcc2.

    femurseg synth /tmp/bil --n 8 --seed 2000 --bilateral
    femurseg predict demo_out/run -i /tmp/bil/imagesTr -o /tmp/bilP_none --postprocess none
    .venv/bin/python benchmarks/bilateral_postprocess.py

Applies femurseg.inference.postprocess.postprocess (what predict applies) to the none masks and prints
the largest components' sizes relative to the largest one.
"""
import numpy as np, glob, os, nibabel as nib
from scipy import ndimage
from femurseg.inference.postprocess import postprocess
def dsc(a,b): return 2*(a&b).sum()/(a.sum()+b.sum())
rows=[]
for p in sorted(glob.glob('/tmp/bilP_none/*.nii.gz')):
    if '_qc' in p or 'prob' in p: continue
    name=os.path.basename(p)[:-len('_0000.nii.gz')]+'.nii.gz'
    g=f'/tmp/bil/labelsTr/{name}'
    if not os.path.exists(g): continue
    im=nib.load(p); m=np.asarray(im.dataobj)>0; gt=np.asarray(nib.load(g).dataobj)>0
    sp=im.header.get_zooms()[:3]
    lab,n=ndimage.label(m,structure=np.ones((3,3,3))); s=np.sort(np.bincount(lab.ravel())[1:])[::-1]
    out={}
    for mode in ('none','lcc','lcc2'):
        q=postprocess(m,mode,sp); tp=(q&gt).sum()
        out[mode]=(dsc(q,gt),tp/q.sum(),tp/gt.sum())
    rows.append(out)
    print(name, 'comp ratios', np.round(s[1:4]/s[0],3), {k:tuple(round(x,3) for x in v) for k,v in out.items()})
for mode in ('none','lcc','lcc2'):
    a=np.array([r[mode] for r in rows]); print(mode,'DSC %.3f ± %.3f precision %.3f recall %.3f'%(a[:,0].mean(),a[:,0].std(ddof=1),a[:,1].mean(),a[:,2].mean()), len(a))
