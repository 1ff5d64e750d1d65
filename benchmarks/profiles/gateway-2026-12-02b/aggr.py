import sys, re, collections
# group samples: for each, stack frames lines; classify kernel samples by syscall
c=collections.Counter(); n=0; kern=0
blocks=open(sys.argv[1]).read().split("\n\n")
for b in blocks:
    lines=[l.strip() for l in b.strip().split("\n") if l.strip()]
    if len(lines)<2: continue
    n+=1
    frames=[l.split(None,1)[1] if len(l.split(None,1))>1 else l for l in lines[1:]]
    if "[kernel.kallsyms]" in frames[0]:
        kern+=1
        sc=[f for f in frames if "__x64_sys_" in f or "__do_sys" in f]
        key=sc[0].split()[0] if sc else ("irq/other: "+frames[0].split()[0])
        # user frame after the kernel
        user=[f for f in frames if "kallsyms" not in f]
        u=user[0].split()[0]+" "+user[0].split()[-1] if user else ""
        c[(key,u[:80])]+=1
for k,v in c.most_common(int(sys.argv[2]) if len(sys.argv)>2 else 25): print(f"{100*v/n:5.1f}% {k}")
print("samples",n,"kernel",kern, f"{100*kern/n:.1f}%")
