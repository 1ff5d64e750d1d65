"""Before/after table of measure.sh output (JSON lines; a `window` field or one file per window)."""
import json, statistics as st, sys
macs=None
m=json.load(open('/work/main/model_repository/manifest.json'))
cum=[e['macs'] for e in m['exits']]; full_macs=m['exits'][-1]['standalone_macs']
def frac(stages):
    n=[stages.get(d,[0])[0] for d in ['15','25','35','45','56']]
    return sum((n[k]-(n[k+1] if k<4 else 0))*cum[k] for k in range(5))/n[0]/full_macs
rows=[]
for i,f in enumerate(sys.argv[1:]):
    for l in open(f):
        if l.startswith('{'):
            d=json.loads(l); d.setdefault('window', i+1); rows.append(d)
print("| window.round | side | full: CPU/req | in backend | **outside** | req/s | early: CPU/req | in backend | outside | req/s | MACs | staging |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
agg={}
for w in sorted(set(r['window'] for r in rows)):
    for rnd in sorted(set(r['round'] for r in rows if r['window']==w)):
        for side in ['before','after']:
            fu=[r for r in rows if r['window']==w and r['round']==rnd and r['side']==side and r['policy']=='full'][0]
            ea=[r for r in rows if r['window']==w and r['round']==rnd and r['side']==side and r['policy']=='early'][0]
            mf=frac(ea['stage_samples_mean_batch_cpu_ms_per_sample'])
            staging=ea['gateway_cpu_ms']-fu['outside_backend_cpu_ms']-mf*fu['backend_cpu_ms']
            vals=dict(fcpu=fu['gateway_cpu_ms'],fb=fu['backend_cpu_ms'],fo=fu['outside_backend_cpu_ms'],ft=fu['throughput'],
                      ecpu=ea['gateway_cpu_ms'],eb=ea['backend_cpu_ms'],eo=ea['outside_backend_cpu_ms'],et=ea['throughput'],mf=mf,stg=staging,
                      fp99=fu['p99_ms'],ep99=ea['p99_ms'],fb_=fu['stage_samples_mean_batch_cpu_ms_per_sample']['56-direct'][1])
            for k,v in vals.items(): agg.setdefault((side,k),[]).append(v)
            print(f"| {w}.{rnd} | {side} | {vals['fcpu']:.3f} | {vals['fb']:.3f} | {vals['fo']:.3f} | {vals['ft']:.0f} | {vals['ecpu']:.3f} | {vals['eb']:.3f} | {vals['eo']:.3f} | {vals['et']:.0f} | {mf:.3f} | {staging:.3f} |")
for side in ['before','after']:
    g=lambda k: st.mean(agg[(side,k)])
    print(f"| **mean** | {side} | **{g('fcpu'):.3f}** | {g('fb'):.3f} | **{g('fo'):.3f}** | {g('ft'):.0f} | **{g('ecpu'):.3f}** | {g('eb'):.3f} | {g('eo'):.3f} | {g('et'):.0f} | {g('mf'):.3f} | {g('stg'):.3f} |")
for side in ['before','after']:
    print(side, "full outside range", min(agg[(side,'fo')]), max(agg[(side,'fo')]), "stdev", round(st.stdev(agg[(side,'fo')]),3),
          "early cpu range", min(agg[(side,'ecpu')]), max(agg[(side,'ecpu')]), "p99 full", round(st.mean(agg[(side,'fp99')]),1), "p99 early", round(st.mean(agg[(side,'ep99')]),1), "full batch", round(st.mean(agg[(side,'fb_')]),2))
