"""PyTorch probe of the siamese set-up in kiln_models::siamese (Fashion-MNIST, classes 7, 8, 9 held out,
PK batches of 7 x 8, Adam 1e-3 with cosine decay, 300 steps, best dev-half AUC every 25 steps), used to
find which trunk reaches ROC AUC 0.90 on the unseen classes before building it in Kiln.
Needs: pip install torch numpy scikit-learn, and the dataset-fashion-mnist package (scripts/setup installs it).
Usage: SEED=42 python3 scripts/siamese_torch_probe.py VARIANT [held,out,classes] [steps]
VARIANT: words joined by _: bn (batch norm), deep (two convs a stage), hard (batch-hard; else batch-all),
feat (score the trunk features), ms, flip, ce (cosine-softmax head), oracle (train on all 10 classes)."""
import gzip, numpy as np, torch, torch.nn as nn, torch.nn.functional as F, sys, time
from sklearn.metrics import roc_auc_score
torch.set_num_threads(1)
d='/usr/share/datasets/fashion-mnist/'
def load(p):
    X=np.frombuffer(gzip.open(d+p+'-images-idx3-ubyte.gz').read()[16:],np.uint8).reshape(-1,1,28,28).astype(np.float32)/255
    y=np.frombuffer(gzip.open(d+p+'-labels-idx1-ubyte.gz').read()[8:],np.uint8)
    return X,y
Xtr,ytr=load('train'); Xte,yte=load('t10k')
held=[int(c) for c in sys.argv[2].split(',')] if len(sys.argv)>2 else [7,8,9]
seen=[c for c in range(10) if c not in held]
if 'oracle' in sys.argv[1]: seen=list(range(10))
m=np.isin(yte,held); Xh=torch.tensor(Xte[m]); yh=yte[m]
rng=np.random.default_rng(1); dev=rng.random(len(yh))<0.5
def pairs(idx,count,r):
    out=[]
    while len(out)<count:
        same=len(out)<count//2
        a,b=r.choice(idx),r.choice(idx)
        if a!=b and (yh[a]==yh[b])==same: out.append((a,b,same))
    return out
P_dev=pairs(np.where(dev)[0],3000,np.random.default_rng(2)); P_test=pairs(np.where(~dev)[0],3000,np.random.default_rng(3))
def auc(E,P):
    E=E.numpy(); s=[-np.linalg.norm(E[a]-E[b]) for a,b,_ in P]; return roc_auc_score([p[2] for p in P],s)
def oneshot(E,r=np.random.default_rng(4)):
    E=E.numpy(); idx=np.where(~dev)[0]; bc=[idx[yh[idx]==c] for c in held]; right=0
    for _ in range(2000):
        t=r.integers(3); q=r.choice(bc[t]); sup=[r.choice(bc[c]) for c in range(3)]
        while sup[t]==q: sup[t]=r.choice(bc[t])
        right+= int(np.argmin([np.linalg.norm(E[q]-E[s]) for s in sup])==t)
    return right/2000
variant=sys.argv[1]
class Net(nn.Module):
    def __init__(s,v):
        super().__init__(); ch=[1,32,64,64]; s.v=v; L=[]
        for i in range(3):
            L.append(nn.Conv2d(ch[i],ch[i+1],3,padding=1))
            if 'bn' in v: L.append(nn.BatchNorm2d(ch[i+1]))
            L.append(nn.ReLU())
            if 'deep' in v:
                L.append(nn.Conv2d(ch[i+1],ch[i+1],3,padding=1))
                if 'bn' in v: L.append(nn.BatchNorm2d(ch[i+1]))
                L.append(nn.ReLU())
            L.append(nn.MaxPool2d(2))
        s.f=nn.Sequential(*L); s.fc=nn.Linear(576,128)
    def forward(s,x,feat=False):
        if 'ms' in s.v and feat:
            outs=[]; h=x
            for layer in s.f:
                h=layer(h)
                if isinstance(layer,nn.MaxPool2d): outs.append(F.normalize(h.flatten(1),dim=1))
            return F.normalize(torch.cat(outs,1),dim=1)
        h=s.f(x).flatten(1)
        if feat: return F.normalize(h,dim=1)
        return F.normalize(s.fc(h),dim=1)
import os; torch.manual_seed(int(os.environ.get("SEED","42")))
net=Net(variant)
def embed(feat=False):
    net.eval()
    with torch.no_grad(): E=torch.cat([net(Xh[i:i+512],feat) for i in range(0,len(Xh),512)])
    net.train(); return E
def batch_all(e,l,margin=0.2):
    D=torch.cdist(e,e); same=l[:,None]==l[None,:]; eye=torch.eye(len(l),dtype=bool)
    pos=same&~eye; neg=~same
    T=D[:,:,None]-D[:,None,:]+margin; mask=pos[:,:,None]&neg[:,None,:]
    T=F.relu(T)*mask; n=(T>1e-16).sum()
    return T.sum()/n.clamp(min=1)
def batch_hard(e,l,margin=0.2):
    D=torch.cdist(e,e); same=l[:,None]==l[None,:]; eye=torch.eye(len(l),dtype=bool)
    dp=(D*(same&~eye)).max(1).values; dn=D.masked_fill(same,1e9).min(1).values
    return F.relu(dp-dn+margin).mean()
steps=int(sys.argv[3]) if len(sys.argv)>3 else 300
head=nn.Parameter(torch.randn(len(seen),128))
opt=torch.optim.Adam(list(net.parameters())+[head],1e-3, weight_decay=0)
sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt,steps)
bc=[np.where(ytr==c)[0] for c in seen]; r=np.random.default_rng(42)
feat='feat' in variant
E=embed(feat); best=(0,auc(E,P_dev),{k:v.clone() for k,v in net.state_dict().items()})
print('untrained test auc',round(auc(E,P_test),3),'oneshot',oneshot(E))
lossf=batch_hard if 'hard' in variant else batch_all
t0=time.time()
for step in range(steps):
    idx=np.concatenate([r.choice(b,8) for b in bc]); x=torch.tensor(Xtr[idx]); l=torch.tensor(ytr[idx].astype(np.int64))
    if 'flip' in variant:
        fl=torch.rand(len(x))<0.5; x[fl]=x[fl].flip(-1)
    e=net(x); loss=lossf(e,l)
    if 'ce' in variant:
        W=F.normalize(head,dim=1); loss=loss+F.cross_entropy(16*e@W.t(), torch.tensor([seen.index(int(c)) for c in l]))
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if (step+1)%25==0:
        E=embed(feat); a=auc(E,P_dev)
        print(step+1, round(loss.item(),4), 'dev', round(a,3), 'test', round(auc(E,P_test),3), flush=True)
        if a>best[1]: best=(step+1,a,{k:v.clone() for k,v in net.state_dict().items()})
net.load_state_dict(best[2]); E=embed(feat)
print(variant,'best step',best[0],'test auc',round(auc(E,P_test),3),'oneshot',oneshot(E), 'time',round(time.time()-t0))
