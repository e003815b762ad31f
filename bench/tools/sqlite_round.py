"""Replays the SQLite store writer's round (S6) in one thread with Python's sqlite3: the ceiling
of the schema and statements without the gateway, sqlx's per-statement thread hand-offs or a
shared CPU. Usage: python3 bench/tools/sqlite_round.py base|from|from-nosent[-merged] <wal_autocheckpoint> <cache KiB>
(e.g. `base 1000 2000`: the statements of herald-store-sql at its defaults). Each round: 64 inserts
in one transaction, then the previous round's 64 `sent` and 64 `acked` updates in another,
WAL, synchronous=FULL, 100 000 messages in a new file /tmp/sim6.db. Prints messages/s."""
import sqlite3,time,sys,os
mode=sys.argv[1]; ckpt=int(sys.argv[2]); cache=int(sys.argv[3])
db='/tmp/sim6.db'
for s in ['','-wal','-shm']:
    try: os.remove(db+s)
    except FileNotFoundError: pass
c=sqlite3.connect(db,isolation_level=None)
c.execute('pragma journal_mode=wal'); c.execute('pragma synchronous=full'); c.execute('pragma temp_store=memory')
c.execute(f'pragma wal_autocheckpoint={ckpt}'); c.execute(f'pragma cache_size=-{cache}')
c.execute("""CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL, topic TEXT NOT NULL, event TEXT NOT NULL, payload TEXT NOT NULL, trace_id TEXT, status TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'acked', 'failed')), retry_count INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL)""")
c.execute("CREATE INDEX messages_user_status_created ON messages (user_id, status, created_at)")
c.execute("CREATE INDEX messages_created ON messages (created_at)")
B=64; N=100000
def ins(lo,hi):
    rows=[]
    for k in range(lo,hi): rows+= [f"s6-1-{k}",f"bench-{k%1000}",f"user/bench-{k%1000}","message",'{"x":"'+'y'*100+'"}','pending',k,k]
    sql="INSERT INTO messages(id,user_id,topic,event,payload,status,created_at,updated_at) VALUES "+",".join(["(?,?,?,?,?,?,?,?)"]*(hi-lo))+" ON CONFLICT (id) DO NOTHING RETURNING id"
    c.execute(sql,rows).fetchall()
def upd(kind,lo,hi):
    setc,only={'sent':("status='sent'","status='pending'"),'acked':("status='acked'","status<>'acked'")}[kind]
    pairs=[x for k in range(lo,hi) for x in (f"bench-{k%1000}",f"s6-1-{k}")]
    ids=[f"s6-1-{k}" for k in range(lo,hi)]
    if 'from' in mode:
        sql=f"UPDATE messages SET {setc}, updated_at=? FROM (VALUES %s) AS v WHERE messages.id = v.column2 AND messages.user_id = v.column1 AND {only} RETURNING messages.user_id, messages.id"%(",".join(["(?,?)"]*(hi-lo)))
        c.execute(sql,[1]+pairs).fetchall()
    else:
        sql=f"UPDATE messages SET {setc}, updated_at=? WHERE {only} AND id IN (%s) AND (user_id,id) IN (%s) RETURNING user_id,id"%(",".join("?"*(hi-lo)),",".join(["(?,?)"]*(hi-lo)))
        c.execute(sql,[1]+ids+pairs).fetchall()
t=time.time(); ti=tu=0
for lo in range(0,N,B):
    hi=lo+B
    a=time.time()
    c.execute('begin'); ins(lo,hi)
    if 'merged' not in mode: c.execute('commit'); c.execute('begin')
    b=time.time()
    if lo>=B:
        if 'nosent' not in mode: upd('sent',lo-B,hi-B)
        upd('acked',lo-B,hi-B)
    c.execute('commit')
    ti+=b-a; tu+=time.time()-b
el=time.time()-t
print(mode,ckpt,cache,'msg/s %.0f'%(N/el),'ins s %.1f upd s %.1f'%(ti,tu))
