-- fraudstream velocity: terminal counters and labeled fraud, the handbook's delayed windows.
-- A terminal's keys hash to another slot than the account's ({term:<id>} vs {acct:<id>}), so
-- terminals have their own script (Redis Cluster refuses a script touching two slots), sent in
-- the same pipeline. Semantics: shared/scoring/features.py (_TerminalModel).
--
-- KEYS:    four per terminal:
--          vc  hash  M1, M2: packed meta (8 doubles each: watermark, floors, sizes, pruning;
--                    running totals of the delayed windows); b<day>: packed (transactions,
--                    labeled fraud) of the day
--          vz  zset  f<txid> fraud-labeled transactions at their event ms; x<txid> (index of
--                    the late results) at XB + the watermark when stored
--          vt  zset  applied transactions at their event ms, each member carrying the stored
--                    result (a replay returns it unchanged)
--          vr  hash  <txid> -> stored result of a LATE transaction (rare: usually absent)
-- ARGV[1]: "A" apply, "P" peek (no writes), "L" labels
-- ARGV[2..]: the entries. Transactions, four arguments each: the numbers, packed
--          little-endian ("<Id": terminal number, 1-based, into KEYS / 4; event ms: one
--          struct.unpack, not two strtod), transaction id, event ms (13 digits), the field name
--          of its day ("b<day>"; the days themselves are computed from the ms). Labels, five each:
--          terminal number, transaction id, "1" fraud or "0" not, the labeled transaction's
--          event ms, its day.
-- Returns: A/P: per entry its record (the form stored for replays: count 1/7/30 d, fraud
--          1/7/30 d as little-endian int32), then per entry its status as one byte; the client
--          decodes both with numpy (packing a row of doubles besides cost ~4.6k instructions an
--          entry, ~5% of the script, counted with callgrind).
--          L: per entry 1 double (1 when the label changed the counts, else 0).
--
-- Cost model: as in account.lua (a redis.call 2-3.5 us in place, most of it around the command).
-- An in-order transaction costs three calls (HMGET, ZADD vt, HSET), a fourth when the delayed
-- windows move to a new day (the days entering, and leaving only where a window holds
-- something: see the advance below); the index prune is skipped when vt holds nothing that old
-- (one member is the newest: pruning and the cap take the oldest first), and nothing is pruned
-- or expired twice for a new terminal. The meta and the running totals are locals, not tables
-- (a table with named fields grows by rehashing): ~20% less Redis CPU per entry than with them.
-- A transaction's days are floors of its ms (not tonumber of arguments: two strtod each) and a
-- PEXPIRE's TTL is a string (no number formatted): ~3.5% fewer instructions per entry.

local LATE = __LATE_MS__
local ID_CAP = __TERMINAL_ID_CAP__
local LATE_CAP = __TERMINAL_LATE_CAP__
local LABEL_CAP = __LABEL_CAP__
local R_T = __TERMINAL_DAY_RETENTION__
local PRUNE_EVERY = __PRUNE_EVERY_MS__
local INDEX_PRUNE_EVERY = __INDEX_PRUNE_EVERY_MS__
local TTL = "__TTL_MS__" -- a string: PEXPIRE then formats no number
local DELAY = __LABEL_DELAY_MS__
local TTL_REFRESH = __TTL_REFRESH_MS__

local DAY = 86400000
local XB = 140737488355328 -- 2^47: late-result index scores start here (fraud ids are below)

local APPLIED, DUPLICATE, LATE_STATUS = 0, 1, 2
local NAN = 0 / 0

local floor = math.floor
local sub, format = string.sub, string.format
local call = redis.call
local pack, unpack_struct = struct.pack, struct.unpack
local META = "<dddddddd"
local REC = "<i4i4i4i4i4i4"
local REC_BYTES = 24 -- six int32
local BUCKET = "<i4i4"

local MODE = ARGV[1]

local function num(x)
  if x ~= x then
    return nil
  end
  return x
end

local function opt(x)
  if x == nil then
    return NAN
  end
  return x
end

local function bucket(v)
  if not v then
    return 0, 0
  end
  return unpack_struct(BUCKET, v)
end

local WIDTH = {1, 7, 30}

-- "b" .. day turns a number into a string (a sprintf and a new string: ~1.5k instructions).
-- The days a batch reads and prunes repeat from entry to entry, so each name is made once a
-- call (measured with callgrind: -4% instructions per entry on the scoring benchmark's
-- terminals, which mostly see a transaction every few days and so move their windows)
local DAY_NAMES = {}
local function day_name(idx)
  local name = DAY_NAMES[idx]
  if name == nil then
    name = "b" .. idx
    DAY_NAMES[idx] = name
  end
  return name
end

-- meta: M1 = wm, floor, label floor, next bucket prune, next index prune, #vt, #fraud ids, #late
--       M2 = dw, then (transactions, fraud) of the windows of 1, 7, 30 days ending at day dw =
--            day(wm - label delay) (running totals), next TTL refresh
-- They are read into locals and written back with one HSET: no table per call.
local function read_meta(m1, m2)
  local wm, fl, lf, np, vp, tn, zn, xn = nil, nil, nil, nil, nil, 0, 0, 0
  local dw, n1, n7, n30, f1, f7, f30, xp = nil, 0, 0, 0, 0, 0, 0, nil
  if m1 then
    wm, fl, lf, np, vp, tn, zn, xn = unpack_struct(META, m1)
    wm, fl, lf, np, vp = num(wm), num(fl), num(lf), num(np), num(vp)
  end
  if m2 then
    dw, n1, n7, n30, f1, f7, f30, xp = unpack_struct(META, m2)
    dw, xp = num(dw), num(xp)
  end
  return wm, fl, lf, np, vp, tn, zn, xn, dw, n1, n7, n30, f1, f7, f30, xp
end

-- (transactions, fraud) of `day` added to the totals of the windows of 1, 7, 30 days ending at
-- `dw` it falls in
local function add_day(dw, day, c, f, n1, n7, n30, f1, f7, f30)
  if day <= dw then
    local age = dw - day
    if age < 1 then
      n1, f1 = n1 + c, f1 + f
    end
    if age < 7 then
      n7, f7 = n7 + c, f7 + f
    end
    if age < 30 then
      n30, f30 = n30 + c, f30 + f
    end
  end
  return n1, n7, n30, f1, f7, f30
end

local function tx_entry(kc, kz, kt, kr, t, txid, t_s, bname)
  -- t is a whole number below 2^53: the floors are exact (the client's // DAY)
  local bt, dd = floor(t / DAY), floor((t - DELAY) / DAY)
  local m = call("HMGET", kc, "M1", "M2", bname)
  local wm0, fl, lf, np, vp, tn, zn, xn, dw, n1, n7, n30, f1, f7, f30, xp = read_meta(m[1], m[2])

  if wm0 ~= nil and t <= wm0 then
    if t > wm0 - LATE then
      local same = call("ZRANGEBYSCORE", kt, t_s, t_s)
      for i = 1, #same do
        local n, pos = unpack_struct("<H", same[i])
        if sub(same[i], pos, pos + n - 1) == txid then
          return sub(same[i], pos + n, pos + n + REC_BYTES - 1), DUPLICATE
        end
      end
    end
    if xn > 0 then
      local r = call("HGET", kr, txid)
      if r and unpack_struct("<d", r) > wm0 - LATE then
        return sub(r, 9), LATE_STATUS
      end
    end
  end

  local status = APPLIED
  if wm0 ~= nil and (t <= wm0 - LATE or (fl ~= nil and t <= fl)) then
    status = LATE_STATUS
  end
  local wm1 = t
  if wm0 ~= nil and wm0 > t then
    wm1 = wm0
  end

  -- The delayed windows end at day dd. The totals in M2 end at dw = day(wm - delay): the same
  -- day for most transactions, a few days entering and leaving when it moves on, an explicit
  -- sum only for a transaction far behind (or the first one). a*, g*: the windows ending at dd.
  local a1, a7, a30, g1, g7, g30 = n1, n7, n30, f1, f7, f30
  local advance = false
  if dw ~= nil and dd == dw then
    advance = false
  elseif dw ~= nil and dd > dw and dd - dw < 30 then
    local v = {n1, n7, n30, f1, f7, f30}
    local names, role = {}, {}
    for idx = dw + 1, dd do
      names[#names + 1] = day_name(idx)
      role[#role + 1] = 0
    end
    for w = 1, 3 do
      local last = dd - WIDTH[w]
      if last > dw then
        last = dw
      end
      -- only days that hold something are read: the counts are exact and not negative, so a
      -- window holding as much as a smaller one (they nest) has nothing in the days between,
      -- and an empty window nothing at all
      local first = dw - WIDTH[w] + 1
      if v[w] == 0 and v[w + 3] == 0 then
        first = last + 1
      else
        for j = 1, w - 1 do
          if v[j] == v[w] and v[j + 3] == v[w + 3] then
            first = dw - WIDTH[j] + 1
            break
          end
        end
      end
      for idx = first, last do
        names[#names + 1] = day_name(idx)
        role[#role + 1] = w
      end
    end
    local got = call("HMGET", kc, unpack(names))
    a1, a7, a30, g1, g7, g30 = n1, n7, n30, f1, f7, f30
    for j = 1, #names do
      if got[j] then
        local c, f = bucket(got[j])
        local w = role[j]
        if w == 0 then
          a1, a7, a30, g1, g7, g30 = add_day(dd, dw + j, c, f, a1, a7, a30, g1, g7, g30)
        elseif w == 1 then
          a1, g1 = a1 - c, g1 - f
        elseif w == 2 then
          a7, g7 = a7 - c, g7 - f
        else
          a30, g30 = a30 - c, g30 - f
        end
      end
    end
    advance = true
  else
    a1, a7, a30, g1, g7, g30 = 0, 0, 0, 0, 0, 0
    if m[1] then
      local lo = dd - 30
      local bw = floor(wm1 / DAY)
      if bw - R_T > lo then
        lo = bw - R_T
      end
      if lo < dd then
        local names = {}
        for idx = lo + 1, dd do
          names[#names + 1] = day_name(idx)
        end
        local got = call("HMGET", kc, unpack(names))
        for j = 1, #names do
          if got[j] then
            local c, f = bucket(got[j])
            a1, a7, a30, g1, g7, g30 = add_day(dd, lo + j, c, f, a1, a7, a30, g1, g7, g30)
          end
        end
      end
    end
    advance = dw == nil or dd > dw
  end
  local record = pack(REC, a1, a7, a30, g1, g7, g30)
  if MODE ~= "A" then
    return record, status
  end

  if status == LATE_STATUS then
    call("HSET", kr, txid, pack("<d", wm0) .. record)
    if xn == 0 then
      call("PEXPIRE", kr, TTL)
    end
    xn = xn + call("ZADD", kz, format("%d", XB + wm0), "x" .. txid)
    if xn > LATE_CAP then
      local gone = call("ZRANGEBYSCORE", kz, format("%d", XB), "+inf", "LIMIT", 0,
        xn - LATE_CAP)
      for i = 1, #gone do
        call("ZREM", kz, gone[i])
        call("HDEL", kr, sub(gone[i], 2))
      end
      xn = xn - #gone
    end
    call("HSET", kc, "M1", pack(META, opt(wm0), opt(fl), opt(lf), opt(np), opt(vp), tn, zn, xn),
      "M2", pack(META, opt(dw), n1, n7, n30, f1, f7, f30, opt(xp)))
    return record, status
  end

  if advance then
    dw, n1, n7, n30, f1, f7, f30 = dd, a1, a7, a30, g1, g7, g30
  end
  local bval
  if bt > floor(wm1 / DAY) - R_T then
    local c, f = bucket(m[3])
    bval = pack(BUCKET, c + 1, f)
    if dw ~= nil then
      n1, n7, n30, f1, f7, f30 = add_day(dw, bt, 1, 0, n1, n7, n30, f1, f7, f30)
    end
  end
  -- the TTL refresh below sets every key's expiry: no PEXPIRE before it then
  local refresh = xp == nil or wm1 >= xp
  call("ZADD", kt, t_s, pack("<H", #txid) .. txid .. record)
  -- vt's newest member is the transaction at the watermark (pruning and the cap take the
  -- oldest first), so with one member nothing is older than wm0
  local oldest = wm1 - LATE + 1
  if tn == 1 then
    oldest = wm0
  elseif tn > 1 then
    oldest = nil
  end
  if tn == 0 and not refresh then
    call("PEXPIRE", kt, TTL)
  end
  tn = tn + 1
  if vp == nil or wm1 >= vp then
    -- ids past the late tolerance go at most INDEX_PRUNE_EVERY late (no call when none is:
    -- this transaction's own is not LATE)
    if oldest == nil or oldest <= wm1 - LATE then
      tn = tn - call("ZREMRANGEBYSCORE", kt, "-inf", wm1 - LATE)
    end
    vp = wm1 + INDEX_PRUNE_EVERY
  end
  if tn > ID_CAP then
    local k = tn - ID_CAP
    local gone = call("ZRANGE", kt, 0, k - 1, "WITHSCORES")
    call("ZREMRANGEBYRANK", kt, 0, k - 1)
    for i = 2, #gone, 2 do
      local ms = tonumber(gone[i])
      if fl == nil or ms > fl then
        fl = ms
      end
    end
    tn = tn - k
  end

  -- Day buckets and fraud ids are pruned at most once per PRUNE_EVERY. The days it drops are
  -- all older than the totals' windows (R_T covers 30 d + the delay + the late tolerance).
  if np == nil or wm1 >= np then
    local cut = floor(wm1 / DAY) - R_T
    local del = {}
    local top = wm0 and floor(wm0 / DAY) or nil
    if top == nil and not m[1] then
      -- nothing was ever written (labels write M1 too): nothing to prune
    elseif top == nil or cut >= top then
      -- first transaction (labels may have come first) or everything is stale: one pass over
      -- the hash, which holds at most the retained days and LABEL_CAP fraud days
      local names = call("HKEYS", kc)
      for i = 1, #names do
        local idx = sub(names[i], 1, 1) == "b" and tonumber(sub(names[i], 2))
        if idx and idx <= cut then
          del[#del + 1] = names[i]
        end
      end
    elseif np ~= nil and cut > floor((np - PRUNE_EVERY) / DAY) - R_T then
      -- the previous prune ran at np - PRUNE_EVERY: buckets that exist are in (its cut, top]
      local start = floor((np - PRUNE_EVERY) / DAY) - R_T + 1
      local bound = top - R_T - floor(PRUNE_EVERY / DAY) - 2
      if start < bound then
        start = bound
      end
      for idx = start, cut do
        del[#del + 1] = day_name(idx)
      end
    end
    if #del > 0 then
      call("HDEL", kc, unpack(del))
    end
    if zn > 0 then
      zn = zn - call("ZREMRANGEBYSCORE", kz, "-inf", (cut + 1) * DAY - 1)
    end
    if xn > 0 then
      local hi = format("%d", XB + wm1 - LATE)
      local gone = call("ZRANGEBYSCORE", kz, format("%d", XB), hi)
      if #gone > 0 then
        local ids = {}
        for i = 1, #gone do
          ids[i] = sub(gone[i], 2)
        end
        call("HDEL", kr, unpack(ids))
        xn = xn - call("ZREMRANGEBYSCORE", kz, format("%d", XB), hi)
      end
    end
    np = wm1 + PRUNE_EVERY
  end
  if refresh then
    call("PEXPIRE", kc, TTL)
    call("PEXPIRE", kt, TTL)
    if zn > 0 or xn > 0 then
      call("PEXPIRE", kz, TTL)
    end
    if xn > 0 then
      call("PEXPIRE", kr, TTL)
    end
    xp = wm1 + TTL_REFRESH
  end
  -- one HSET, its arguments listed; the bucket first (the hash's layout as before)
  local m1 = pack(META, wm1, opt(fl), opt(lf), opt(np), opt(vp), tn, zn, xn)
  local m2 = pack(META, opt(dw), n1, n7, n30, f1, f7, f30, opt(xp))
  if bval then
    call("HSET", kc, bname, bval, "M1", m1, "M2", m2)
  else
    call("HSET", kc, "M1", m1, "M2", m2)
  end
  return record, status
end

local function label_entry(kc, kz, txid, fraud, t_s, day_s)
  local t, day = tonumber(t_s), tonumber(day_s)
  local m = call("HMGET", kc, "M1", "M2", "b" .. day_s)
  local wm0, fl, lf, np, vp, tn, zn, xn, dw, n1, n7, n30, f1, f7, f30, xp = read_meta(m[1], m[2])
  if wm0 ~= nil and day <= floor(wm0 / DAY) - R_T then
    return 0 -- past retention: the day it would count on is gone
  end
  if lf ~= nil and t <= lf then
    return 0 -- its id may have been evicted by the cap: never count it twice
  end
  local old = tonumber(call("ZSCORE", kz, "f" .. txid))
  local known = old ~= nil and (wm0 == nil or floor(old / DAY) > floor(wm0 / DAY) - R_T)
  local bname, bval, changed_day, delta
  if fraud == "1" and not known then
    zn = zn + call("ZADD", kz, t_s, "f" .. txid)
    local c, f = bucket(m[3])
    bname, bval = day_name(day), pack(BUCKET, c, f + 1)
    changed_day, delta = day, 1
    if zn > LABEL_CAP then
      local k = zn - LABEL_CAP
      local gone = call("ZRANGE", kz, 0, k - 1, "WITHSCORES")
      call("ZREMRANGEBYRANK", kz, 0, k - 1)
      for i = 2, #gone, 2 do
        local ms = tonumber(gone[i])
        if lf == nil or ms > lf then
          lf = ms
        end
      end
      zn = zn - k
    end
  elseif fraud == "0" and known then
    call("ZREM", kz, "f" .. txid)
    zn = zn - 1
    local od = floor(old / DAY)
    local v = m[3]
    if od ~= day then
      v = call("HGET", kc, day_name(od))
    end
    local c, f = bucket(v)
    bname, bval = day_name(od), pack(BUCKET, c, f - 1)
    changed_day, delta = od, -1
  else
    return 0
  end
  if dw ~= nil then
    n1, n7, n30, f1, f7, f30 = add_day(dw, changed_day, 0, delta, n1, n7, n30, f1, f7, f30)
  end
  call("HSET", kc, bname, bval, "M1", pack(META, opt(wm0), opt(fl), opt(lf), opt(np), opt(vp),
    tn, zn, xn), "M2", pack(META, opt(dw), n1, n7, n30, f1, f7, f30, opt(xp)))
  -- labels may reach a terminal before (or without) any transaction: keep its keys expiring
  call("PEXPIRE", kc, TTL)
  if zn > 0 then
    call("PEXPIRE", kz, TTL)
  end
  return 1
end

-- The fields are arguments of their own: Redis builds ARGV in C, where splitting one payload
-- in Lua (find and sub per field) cost ~0.25 us per field.
local F = ARGV
local nf = #F
local out = {}
local i = 2
if MODE == "L" then
  while i + 4 <= nf do
    local base = (tonumber(F[i]) - 1) * 4
    out[#out + 1] = pack("<d", label_entry(KEYS[base + 1], KEYS[base + 2], F[i + 1], F[i + 2],
      F[i + 3], F[i + 4]))
    i = i + 5
  end
else
  local statuses = {}
  local STATUS_BYTES = {"\0", "\1", "\2"} -- one byte per entry: no string made for it
  while i + 3 <= nf do
    local number, t = unpack_struct("<Id", F[i])
    local base = (number - 1) * 4
    local record, status = tx_entry(KEYS[base + 1], KEYS[base + 2], KEYS[base + 3],
      KEYS[base + 4], t, F[i + 1], F[i + 2], F[i + 3])
    out[#out + 1] = record
    statuses[#statuses + 1] = STATUS_BYTES[status + 1]
    i = i + 4
  end
  return table.concat(out) .. table.concat(statuses)
end
return table.concat(out)
