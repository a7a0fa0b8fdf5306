-- fraudstream velocity: every transaction of any number of accounts, updated and read in one call.
-- The semantics are those of shared/scoring/features.py (ReferenceVelocity); the key layout and
-- the reasons for it are in shared/scoring/velocity.py. The upper-case placeholders are filled
-- from VelocityConfig before the script is loaded.
--
-- Cost model (measured on Redis 7.0, in place: 5000 accounts, 500 entries a call): a redis.call
-- costs 2-3.5 us (the command itself a quarter of that: the rest is marshalling, the key lookup's
-- cache misses, the propagation bookkeeping of writes), turning a Lua number into a string
-- ~0.4 us, a table ~0.1 us, splitting a field out of one payload string ~0.25 us. So the script
-- makes few calls: the windows are running totals that read only what leaves them, and only when
-- something can (edge_of: a window holding one member, or as many as a smaller one, needs no
-- read); prunes and expiries are skipped when they would do nothing. An in-order transaction
-- then costs six to eight calls: HMGET, ZMSCORE, ZCOUNT (merchants), ZADD vz, ZADD vt, HSET, and
-- when something leaves a window or a prune is due one more each (M3's bound on vt's members
-- skips the index prune and window reads when vt holds nothing that old; the 6 h bucket that
-- leaves the 7 d window when it moves by one bucket comes with the first HMGET: of the second
-- HMGETs, that saves 2/3 in the scoring benchmark, -0.28 a transaction, and 40% in a 50-day
-- history of 2 payments a day, -0.27 a transaction). The common path
-- allocates no Lua table besides the calls' replies: the totals, distinct counts and members
-- are locals (dropping the nine tables an entry made cut ~3 us, ~9%, of its Redis CPU). Times,
-- bucket names and score bounds come from the client as strings, each field its own argument
-- (ARGV is built in C); the bucket numbers are floor(t / width) (exact: no tonumber, which is
-- two strtod), a PEXPIRE's TTL is a string, the 24 h window's upper bound "(" .. lo_s. Every
-- argument and reply string costs too (~3k instructions an HMGET field, measured: pre-reading
-- a second 6 h bucket and the day leaving the 30 d window cost more than the calls it saved).
--
-- KEYS:    four per account, in order:
--          vc  hash  M1, M2, M3: packed meta (at most 8 doubles: the hash stays a listpack);
--                    q<6 hours> / d<day>: buckets, packed (count, sum)
--          vz  zset  m<merchant>, c<country>, d<device> at their last-seen ms, the kinds in the
--                    score ranges [0, 1e13), [1e13, 2e13), [2e13, 3e13): a score is the kind's
--                    digit followed by the 13-digit ms; x<txid> (index of the late results) at
--                    4e13 + the watermark when the result was stored
--          vt  zset  the applied transactions at their event ms, each member carrying the
--                    amount, the id and the stored result (a replay returns it unchanged)
--          vr  hash  <txid> -> stored result of a LATE transaction (rare: usually absent)
-- ARGV[1]: "A" apply, "P" peek (no writes), "S" snapshot (no writes, no transaction added)
-- ARGV[2..]: the entries, eleven arguments each: the numbers, packed little-endian ("<Idd":
--          account number, 1-based, into KEYS / 4; event ms; amount, integer 1e-4 major units:
--          one struct.unpack, where tonumber of three decimal strings was three strtod, ~2.1k
--          instructions each), transaction id, event ms (13 digits), max(0, ms - 24 h + 1) (13
--          digits), the field names of its 6-hour and day buckets ("q<b>", "d<d>") and of the
--          6-hour bucket 28 before ("q<b - 28>": the one that leaves the 7 d window when the
--          transaction moves it by one bucket), merchant, country, device, "lat lon" or "" when
--          the transaction has no location
-- Returns: one string: per entry its record (REC below, the form stored for replays: the 18
--          values, counts as int32, after the transaction's own location, which only a stored
--          record needs), then one byte per entry: status * 2 + newest, newest 1 when the
--          transaction was its account's newest when the script reached it (nothing later had
--          been applied: t >= the watermark). Newest is not a feature: it tells the assessment
--          store that no newer assessment can be stored. The client decodes the records with
--          numpy (packing a row of 19 doubles besides cost ~8.5k instructions an entry, ~3.6% of
--          the script, counted with callgrind; a replay now returns its stored record as is).

local LATE = __LATE_MS__
local ID_CAP = __ID_CAP__
local LATE_CAP = __LATE_CAP__
local PRUNE_EVERY = __PRUNE_EVERY_MS__
local INDEX_PRUNE_EVERY = __INDEX_PRUNE_EVERY_MS__
local TTL = "__TTL_MS__" -- a string: PEXPIRE then formats no number
local TTL_REFRESH = __TTL_REFRESH_MS__
local SCAN_K = __SCAN_K__
local R_Q = __QUARTER_RETENTION__
local R_D = __DAY_RETENTION__
local R_M = __MERCHANT_RETENTION_MS__
local R_CD = __DISTINCT_RETENTION_MS__
local DIM_CAP = {__MERCHANT_CAP__, __COUNTRY_CAP__, __DEVICE_CAP__}

local Q = 21600000 -- 6 h buckets for the 7 d window
local DAY = 86400000
local W = {60000, 3600000, 86400000} -- windows 1-3 exact over vt; 4 = 7 d (q); 5 = 30 d (d)
local KIND = 10000000000000 -- 1e13 ms (year 2286): the score range of one distinct kind
local DIM_BASE = {0, KIND, 2 * KIND}
local DIM_TAG = {"", "1", "2"}
local DIM_TOP = {"9999999999999", "19999999999999", "29999999999999"}
local DIM_PREFIX = {"m", "c", "d"}
local DIM_RET = {R_M, R_CD, R_CD}
local XB = 4 * KIND
local TIERS = {{"q", Q, 28, R_Q, 4}, {"d", DAY, 30, R_D, 5}} -- prefix, width, window, retention

-- prefix .. index turns a number into a string (a sprintf and a new string: ~1.5k
-- instructions). The buckets a batch reads and prunes repeat from entry to entry, so each name
-- is made once a call (callgrind: -1.6% instructions per entry on the scoring benchmark)
local BUCKET_NAMES = {q = {}, d = {}}
local function bucket_name(prefix, idx)
  local made = BUCKET_NAMES[prefix]
  local name = made[idx]
  if name == nil then
    name = prefix .. idx
    made[idx] = name
  end
  return name
end

local APPLIED, DUPLICATE, LATE_STATUS, UNKNOWN = 0, 1, 2, 3
local NAN = 0 / 0

local floor = math.floor
local find, sub, format = string.find, string.sub, string.format
local call = redis.call
local pack, unpack_struct = struct.pack, struct.unpack
local META = "<dddddddd"
-- a stored result: located, lat, lon, then the 18 values (counts and distinct as int32)
local REC = "<Bddi4di4di4di4di4di4i4i4ddddd"
local BUCKET = "<dd"

local MODE = ARGV[1]
local newest -- set by entry(): see Returns above
local OWN = MODE ~= "S"

local function num(x) -- a double that is "none" when NaN
  if x ~= x then
    return nil
  end
  return x
end

local function opt(x) -- nil -> NaN for packing
  if x == nil then
    return NAN
  end
  return x
end

local function I(x)
  return format("%d", x)
end

-- A vt member: amount, id length, id, stored result. Parsing needs only the fixed header.
local function tx_amount(member)
  return (unpack_struct("<d", member))
end

local function tx_id_and_record(member)
  local _, n, pos = unpack_struct("<dH", member)
  return sub(member, pos, pos + n - 1), sub(member, pos + n)
end

local function bucket(v)
  if not v then
    return 0, 0
  end
  return unpack_struct(BUCKET, v)
end

-- Every member of window k (1-3: vt, 4-5: buckets) ending at wm has its ms > window_start.
local function window_start(k, wm)
  if k <= 3 then
    return wm - W[k]
  elseif k == 4 then
    return (floor(wm / Q) - 27) * Q - 1
  end
  return (floor(wm / DAY) - 29) * DAY - 1
end

-- A bound below every member of window k: the window's start, or the start of a smaller window
-- holding as many (the windows nest and the totals are exact counts, a member evicted from vt
-- by the cap only making the smaller count smaller), or wm - 1 when the one member is the
-- transaction at the watermark (vt's newest: pruning and the cap take the oldest first).
-- n1..n5: the windows' counts (locals, not a table: no allocation per call).
local function edge_of(k, wm, n1, n2, n3, n4, n5)
  local n = n5
  if k == 1 then
    n = n1
  elseif k == 2 then
    n = n2
  elseif k == 3 then
    n = n3
  elseif k == 4 then
    n = n4
  end
  if n == 1 then
    return wm - 1
  elseif k > 1 and n1 == n then
    return window_start(1, wm)
  elseif k > 2 and n2 == n then
    return window_start(2, wm)
  elseif k > 3 and n3 == n then
    return window_start(3, wm)
  elseif k > 4 and n4 == n then
    return window_start(4, wm)
  end
  return window_start(k, wm)
end

-- Window k (1-3: vt) moves from wm0 to wm1: what leaves it comes off its total (c, s), read
-- only when something can (edge_of, and vt_edge: every vt member is later than it). The window
-- moves only for a transaction in order (wm1 = t), so the 24 h window's upper bound t - 24 h is
-- "(" .. lo_s (scores are whole ms): one number formatted, not two.
local function slide(kt, k, c, s, wm0, wm1, vt_edge, n1, n2, n3, n4, n5, lo_s)
  local w = W[k]
  if wm1 - w >= wm0 then
    return 0, 0
  elseif c > 1 and wm1 - w > edge_of(k, wm0, n1, n2, n3, n4, n5)
    and (vt_edge == nil or wm1 - w > vt_edge) then
    local hi = wm1 - w
    if k == 3 then
      hi = "(" .. lo_s
    end
    local gone = call("ZRANGEBYSCORE", kt, wm0 - w + 1, hi)
    for i = 1, #gone do
      c, s = c - 1, s - tx_amount(gone[i])
    end
  end
  return c, s
end

-- Distinct members of kind j (1 merchants, 2 countries, 3 devices) last seen in the
-- transaction's 24 h (its own counted), from the ZMSCORE of its own member (sc) and the kind's
-- size n: one ZCOUNT, none when the kind's only member is the transaction's own. Returns the
-- own member's previous last-seen ms (nil: new; for countries and devices possibly its score
-- string, which the caller only tests for nil) and the count.
local function distinct(kz, j, sc, n, own, t, lo_s, wm1)
  if OWN and n == 1 and sc then
    -- the kind's only member is this transaction's own (typical for countries and devices);
    -- only a merchant's last visit is used as a number (of the others only "seen before"
    -- matters): no tonumber, two strtod, for them
    if j == 1 then
      return tonumber(sc), 1
    end
    return sc, 1
  end
  local old
  if sc then
    old = tonumber(sc) - DIM_BASE[j]
  end
  local lo_j = t - DAY
  if wm1 - DIM_RET[j] > lo_j then
    lo_j = wm1 - DIM_RET[j] -- only for a LATE transaction
  end
  local d = 0
  if n > 0 then
    local bound
    if lo_j == t - DAY then
      bound = DIM_TAG[j] .. lo_s
    else
      bound = I(DIM_BASE[j] + lo_j + 1)
    end
    d = call("ZCOUNT", kz, bound, DIM_TOP[j])
  end
  if OWN and own ~= "" and not (old ~= nil and old > lo_j) then
    d = d + 1
  end
  return old, d
end

-- The cap of kind j: its oldest members go when a new one (own) took it past the cap.
local function dim_cap(kz, j, n, own, old)
  if own ~= "" and old == nil and n > DIM_CAP[j] then
    local evict = call("ZRANGEBYSCORE", kz, DIM_BASE[j], DIM_TOP[j], "LIMIT", 0, n - DIM_CAP[j])
    return n - call("ZREM", kz, unpack(evict))
  end
  return n
end

local function entry(kc, kz, kt, kr, t, amt, txid, t_s, lo_s, qname, dname, q28, mer, cty,
                     dev, loc)
  -- with the meta and the transaction's own buckets, q28: the 6 h bucket that leaves the 7 d
  -- window when an in-order transaction moves it by one bucket (m[6]), so a second HMGET only
  -- for a longer gap or a day leaving the 30 d window (measured: pre-reading the next bucket or
  -- the day as well cost more, in lookups of fields mostly absent, than the calls they saved)
  local m = call("HMGET", kc, "M1", "M2", "M3", qname, dname, q28)
  -- meta: M1 = watermark, horizon floor, next bucket prune, next index prune, newest located
  -- (ms, lat, lon), next TTL refresh; M2, M3 = running (count, sum) of the five windows, then
  -- the sizes of vt, of the three distinct kinds in vz and of the late index, and ve: a bound
  -- below every vt member's ms (the first transaction's, raised by the index prune), so the
  -- prune and the window reads run only when vt can hold something that old (an M3 of seven
  -- doubles, written before, reads as "unknown")
  local wm0, fl, np, vp, lm, la, lo, xp
  local c1, s1, c2, s2, c3, s3, c4, s4, c5, s5 = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
  local tn, xn = 0, 0
  local ve -- every vt member has its ms > ve (nil: unknown; kept in M3's last slot)
  local dc1, dc2, dc3 = 0, 0, 0 -- members of each distinct kind in vz (exact: caps need no call)
  if m[1] then
    wm0, fl, np, vp, lm, la, lo, xp = unpack_struct(META, m[1])
    fl, np, vp, lm, xp = num(fl), num(np), num(vp), num(lm), num(xp)
    c1, s1, c2, s2, c3, s3, c4, s4 = unpack_struct(META, m[2])
    if #m[3] == 64 then
      c5, s5, tn, dc1, dc2, dc3, xn, ve = unpack_struct(META, m[3])
      ve = num(ve)
    else -- written before the slot was used
      c5, s5, tn, dc1, dc2, dc3, xn = unpack_struct("<ddddddd", m[3])
    end
  end
  newest = wm0 == nil or t >= wm0
  if not OWN and wm0 == nil then
    return pack(REC, 0, NAN, NAN, 0, NAN, 0, NAN, 0, NAN, 0, NAN, 0, NAN, 0, 0, 0, NAN, NAN, NAN,
      NAN, NAN), UNKNOWN
  end

  -- 1. Seen before: the result it got then. A replay carries the event time of the original,
  -- which is <= the watermark, so in-order traffic skips the lookup.
  if OWN and wm0 ~= nil and t <= wm0 then
    if t > wm0 - LATE and (ve == nil or t > ve) then
      local same = call("ZRANGEBYSCORE", kt, t_s, t_s)
      for i = 1, #same do
        local id, record = tx_id_and_record(same[i])
        if id == txid then
          return record, DUPLICATE
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

  -- 2. At or before the horizon: scored, never counted (its id may be gone: no double count).
  local status = APPLIED
  if wm0 ~= nil and (t <= wm0 - LATE or (fl ~= nil and t <= fl)) then
    status = LATE_STATUS
  end
  local wm1 = t
  if wm0 ~= nil and wm0 > t then
    wm1 = wm0
  end
  local inorder = wm0 == nil or t >= wm0

  -- 3. Running totals (windows ending at the watermark) move from wm0 to wm1: each member or
  -- bucket leaves a window once, so this is O(1) amortized for in-order traffic. Locals, not
  -- tables: c1..c5 stay the counts at wm0.
  local tc1, tc2, tc3, tc4, tc5 = c1, c2, c3, c4, c5
  local ts1, ts2, ts3, ts4, ts5 = s1, s2, s3, s4, s5
  -- every vt member has its ms > vt_edge (nil: unknown), to skip the index prune when it
  -- would remove nothing
  local vt_edge
  if tn == c3 and tn > 1 then
    vt_edge = edge_of(3, wm0, c1, c2, c3, c4, c5) -- vt holds nothing older than the 24 h window
  elseif tn == 0 then
    vt_edge = wm1 - LATE -- only this transaction's own, which is not LATE
  elseif tn == 1 then
    vt_edge = wm0 - 1 -- the newest member is the transaction at the watermark (pruning and
    -- the cap take the oldest first)
  end
  if ve ~= nil and (vt_edge == nil or ve > vt_edge) then
    vt_edge = ve
  end
  if wm0 ~= nil and wm1 > wm0 then
    -- What may leave a window is read only when something can (edge_of): most transactions
    -- read nothing here (in a dense account nothing leaves, a sparse one holds one member).
    local b0, b1 = floor(wm0 / Q), floor(wm1 / Q)
    local d0, d1 = floor(wm0 / DAY), floor(wm1 / DAY)
    tc1, ts1 = slide(kt, 1, tc1, ts1, wm0, wm1, vt_edge, c1, c2, c3, c4, c5, lo_s)
    tc2, ts2 = slide(kt, 2, tc2, ts2, wm0, wm1, vt_edge, c1, c2, c3, c4, c5, lo_s)
    tc3, ts3 = slide(kt, 3, tc3, ts3, wm0, wm1, vt_edge, c1, c2, c3, c4, c5, lo_s)
    -- the buckets b0 - 27 .. b1 - 28 and days d0 - 29 .. d1 - 30 leave; wm1 = t here, so the
    -- newest bucket came with the meta (q28 = b1 - 28)
    local names, owner
    if b1 > b0 then
      if b1 - 28 >= b0 then
        tc4, ts4 = 0, 0
      elseif tc4 > 1 and (b1 - 27) * Q - 1 > edge_of(4, wm0, c1, c2, c3, c4, c5) then
        local c, s = bucket(m[6])
        tc4, ts4 = tc4 - c, ts4 - s
        if b1 - 29 >= b0 - 27 then
          names, owner = {}, {}
          for idx = b0 - 27, b1 - 29 do
            names[#names + 1] = bucket_name("q", idx)
            owner[#owner + 1] = 4
          end
        end
      end
    end
    if d1 > d0 then
      if d1 - 30 >= d0 then
        tc5, ts5 = 0, 0
      elseif tc5 > 1 and (d1 - 29) * DAY - 1 > edge_of(5, wm0, c1, c2, c3, c4, c5) then
        names, owner = names or {}, owner or {}
        for idx = d0 - 29, d1 - 30 do
          names[#names + 1] = bucket_name("d", idx)
          owner[#owner + 1] = 5
        end
      end
    end
    if names then
      local got = call("HMGET", kc, unpack(names))
      for i = 1, #names do
        if got[i] then
          local c, s = bucket(got[i])
          if owner[i] == 4 then
            tc4, ts4 = tc4 - c, ts4 - s
          else
            tc5, ts5 = tc5 - c, ts5 - s
          end
        end
      end
    end
  end

  -- 4. The transaction's own windows: the totals when they end where it is, else (out of
  -- order) summed explicitly over what retention still holds.
  local h1, h2, h3, h4, h5 = tc1, tc2, tc3, tc4, tc5
  local g1, g2, g3, g4, g5 = ts1, ts2, ts3, ts4, ts5
  if not inorder then
    local hc, hs = {0, 0, 0, tc4, tc5}, {0, 0, 0, ts4, ts5}
    local lo24 = t - DAY
    if wm1 - LATE > lo24 then
      lo24 = wm1 - LATE
    end
    if lo24 < t then
      local got = call("ZRANGEBYSCORE", kt, lo24 + 1, t_s, "WITHSCORES")
      for i = 1, #got, 2 do
        local ms, a = tonumber(got[i + 1]), tx_amount(got[i])
        for k = 1, 3 do
          if ms > t - W[k] then
            hc[k], hs[k] = hc[k] + 1, hs[k] + a
          end
        end
      end
    end
    local names, owner = {}, {}
    for x = 1, 2 do
      local tier = TIERS[x]
      local prefix, g, w, r, k = tier[1], tier[2], tier[3], tier[4], tier[5]
      local bt, bw = floor(t / g), floor(wm1 / g)
      if bt ~= bw then
        hc[k], hs[k] = 0, 0
        local lo_b = bt - w
        if bw - r > lo_b then
          lo_b = bw - r
        end
        for idx = lo_b + 1, bt do
          names[#names + 1] = bucket_name(prefix, idx)
          owner[#owner + 1] = k
        end
      end
    end
    if #names > 0 then
      local got = call("HMGET", kc, unpack(names))
      for i = 1, #names do
        if got[i] then
          local c, s = bucket(got[i])
          local k = owner[i]
          hc[k], hs[k] = hc[k] + c, hs[k] + s
        end
      end
    end
    h1, h2, h3, h4, h5 = hc[1], hc[2], hc[3], hc[4], hc[5]
    g1, g2, g3, g4, g5 = hs[1], hs[2], hs[3], hs[4], hs[5]
  end
  local one, own_amt = 0, 0 -- the transaction counts in its own windows
  if OWN then
    one, own_amt = 1, amt
  end

  -- 5. Distinct merchants, countries, devices (last seen > t - 24 h), the merchant's last visit.
  local mm, mc, md = "m" .. mer, "c" .. cty, "d" .. dev -- their vz members (written below)
  local sc = call("ZMSCORE", kz, mm, mc, md)
  local o1, dn1 = distinct(kz, 1, sc[1], dc1, mer, t, lo_s, wm1)
  local o2, dn2 = distinct(kz, 2, sc[2], dc2, cty, t, lo_s, wm1)
  local o3, dn3 = distinct(kz, 3, sc[3], dc3, dev, t, lo_s, wm1)
  local mer_last = nil
  if OWN and o1 ~= nil and o1 > wm1 - R_M then
    mer_last = o1
  end

  -- 6. The previous transaction by event time (and the previous located one).
  local prev, ploc, plat, plon = nil, nil, nil, nil
  if wm0 ~= nil then
    if inorder then
      prev = wm0
      if lm ~= nil then
        ploc, plat, plon = lm, la, lo
      end
    else
      local got = call("ZREVRANGEBYSCORE", kt, t_s, wm1 - LATE + 1, "WITHSCORES", "LIMIT", 0,
        SCAN_K)
      if #got > 0 then
        prev = tonumber(got[2])
      end
      for i = 1, #got, 2 do
        local _, record = tx_id_and_record(got[i])
        local located, rla, rlo = unpack_struct("<Bdd", record)
        if located == 1 then
          ploc, plat, plon = tonumber(got[i + 1]), rla, rlo
          break
        end
      end
    end
  end

  -- the 18 values as locals, packed straight into the record (no table)
  local v1, v2, v3, v4 = h1 + one, g1 + own_amt, h2 + one, g2 + own_amt
  local v5, v6, v7, v8 = h3 + one, g3 + own_amt, h4 + one, g4 + own_amt
  local v9, v10 = h5 + one, g5 + own_amt
  local v14, v15, v16, v17, v18 = opt(prev), opt(ploc), opt(plat), opt(plon), opt(mer_last)
  if MODE ~= "A" then -- the transaction's own location only matters to a stored record
    return pack(REC, 0, NAN, NAN, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, dn1, dn2, dn3, v14,
      v15, v16, v17, v18), status
  end

  -- 7. Writes.
  local located, my_lat, my_lon = 0, NAN, NAN
  if loc ~= "" then
    local sp = find(loc, " ", 1, true)
    located, my_lat, my_lon = 1, tonumber(sub(loc, 1, sp - 1)), tonumber(sub(loc, sp + 1))
  end
  local record = pack(REC, located, my_lat, my_lon, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10,
    dn1, dn2, dn3, v14, v15, v16, v17, v18)
  if status == LATE_STATUS then
    call("HSET", kr, txid, pack("<d", wm0) .. record)
    if xn == 0 then
      call("PEXPIRE", kr, TTL)
    end
    xn = xn + call("ZADD", kz, I(XB + wm0), "x" .. txid)
    if xn > LATE_CAP then
      local gone = call("ZRANGEBYSCORE", kz, I(XB), "+inf", "LIMIT", 0, xn - LATE_CAP)
      for i = 1, #gone do
        call("ZREM", kz, gone[i])
        call("HDEL", kr, sub(gone[i], 2))
      end
      xn = xn - #gone
    end
    call("HSET", kc, "M3", pack(META, tc5, ts5, tn, dc1, dc2, dc3, xn, opt(ve)))
    return record, status
  end

  -- the totals now end at wm1; the transaction joins the windows it falls in
  if t > wm1 - W[1] then
    tc1, ts1 = tc1 + 1, ts1 + amt
  end
  if t > wm1 - W[2] then
    tc2, ts2 = tc2 + 1, ts2 + amt
  end
  if t > wm1 - W[3] then
    tc3, ts3 = tc3 + 1, ts3 + amt
  end
  -- t is a whole number below 2^53: floor(t / Q) is exact (as the client's t // Q), no strtod
  local bq, bd = floor(t / Q), floor(t / DAY)
  local qw, dw = floor(wm1 / Q), floor(wm1 / DAY)
  if bq > qw - 28 then
    tc4, ts4 = tc4 + 1, ts4 + amt
  end
  if bd > dw - 30 then
    tc5, ts5 = tc5 + 1, ts5 + amt
  end

  -- the TTL refresh below sets every key's expiry: no PEXPIRE before it then
  local refresh = xp == nil or wm1 >= xp
  local qv, dv -- the transaction's buckets, when within retention
  if bq > qw - R_Q then
    local c, s = bucket(m[4])
    qv = pack(BUCKET, c + 1, s + amt)
  end
  if bd > dw - R_D then
    local c, s = bucket(m[5])
    dv = pack(BUCKET, c + 1, s + amt)
  end
  if located == 1 and (lm == nil or t >= lm) then
    lm, la, lo = t, my_lat, my_lon
  end

  local added = true
  if mer ~= "" and cty ~= "" and dev ~= "" then
    call("ZADD", kz, "GT", t_s, mm, "1" .. t_s, mc, "2" .. t_s, md) -- no table
  elseif mer ~= "" or cty ~= "" or dev ~= "" then
    local z = {}
    if mer ~= "" then
      z[#z + 1] = t_s
      z[#z + 1] = mm
    end
    if cty ~= "" then
      z[#z + 1] = "1" .. t_s
      z[#z + 1] = mc
    end
    if dev ~= "" then
      z[#z + 1] = "2" .. t_s
      z[#z + 1] = md
    end
    call("ZADD", kz, "GT", unpack(z))
  else
    added = false
  end
  if added then
    if dc1 + dc2 + dc3 + xn == 0 and not refresh then
      call("PEXPIRE", kz, TTL)
    end
    if mer ~= "" and o1 == nil then
      dc1 = dc1 + 1
    end
    if cty ~= "" and o2 == nil then
      dc2 = dc2 + 1
    end
    if dev ~= "" and o3 == nil then
      dc3 = dc3 + 1
    end
  end
  call("ZADD", kt, t_s, pack("<dH", amt, #txid) .. txid .. record)
  if tn == 0 and not refresh then
    call("PEXPIRE", kt, TTL)
  end
  -- the bound on vt's members (ve) now covers this transaction's own
  if tn == 0 then
    ve = t - 1
  elseif vt_edge ~= nil and t - 1 < vt_edge then
    ve = t - 1
  else
    ve = vt_edge
  end
  tn = tn + 1
  if vp == nil or wm1 >= vp then
    -- ids past the late tolerance go at most INDEX_PRUNE_EVERY late: vt holds the stored
    -- results, the bulk of an account's memory (no call when nothing is that old)
    if vt_edge == nil or wm1 - LATE > vt_edge then
      tn = tn - call("ZREMRANGEBYSCORE", kt, "-inf", wm1 - LATE)
      if ve == nil or wm1 - LATE > ve then
        ve = wm1 - LATE
      end
    end
    vp = wm1 + INDEX_PRUNE_EVERY
  end

  -- caps: the oldest ids go first and raise the horizon, so a replay of them is never counted
  if tn > ID_CAP then
    local k = tn - ID_CAP
    local gone = call("ZRANGE", kt, 0, k - 1, "WITHSCORES")
    call("ZREMRANGEBYRANK", kt, 0, k - 1)
    for i = 1, #gone, 2 do
      local ms, a = tonumber(gone[i + 1]), tx_amount(gone[i])
      if fl == nil or ms > fl then
        fl = ms
      end
      if ms > wm1 - W[1] then
        tc1, ts1 = tc1 - 1, ts1 - a
      end
      if ms > wm1 - W[2] then
        tc2, ts2 = tc2 - 1, ts2 - a
      end
      if ms > wm1 - W[3] then
        tc3, ts3 = tc3 - 1, ts3 - a
      end
    end
    tn = tn - k
  end
  dc1 = dim_cap(kz, 1, dc1, mer, o1)
  dc2 = dim_cap(kz, 2, dc2, cty, o2)
  dc3 = dim_cap(kz, 3, dc3, dev, o3)

  -- 8. Buckets and merchants are pruned at most once per PRUNE_EVERY of event time. Reads
  -- already ignore what is past retention, so this only bounds memory.
  if np == nil or wm1 >= np then
    local del = {}
    for x = 1, 2 do
      local tier = TIERS[x]
      local prefix, g, r = tier[1], tier[2], tier[4]
      local cut = floor(wm1 / g) - r
      -- the previous prune ran at np - PRUNE_EVERY and dropped every bucket <= p
      local p = np and (floor((np - PRUNE_EVERY) / g) - r)
      if p ~= nil and wm0 ~= nil and cut > p then
        -- buckets that exist are in (p, floor(wm0 / g)]: at most r + PRUNE_EVERY / g + 1
        local top = floor(wm0 / g)
        local hi = cut
        if top < hi then
          hi = top
        end
        local start = p + 1
        local bound = top - r - floor(PRUNE_EVERY / g) - 2
        if start < bound then
          start = bound
        end
        for idx = start, hi do
          del[#del + 1] = bucket_name(prefix, idx)
        end
      end
    end
    if #del > 0 then
      call("HDEL", kc, unpack(del))
    end
    -- only merchants are pruned by time: countries and devices are few, and their caps bound
    -- them (reads ignore members past retention either way); a new account's only merchant is
    -- its own, just seen
    if dc1 > 0 and wm0 ~= nil then
      dc1 = dc1 - call("ZREMRANGEBYSCORE", kz, "-inf", wm1 - R_M)
    end
    if xn > 0 then
      local hi = I(XB + wm1 - LATE)
      local gone = call("ZRANGEBYSCORE", kz, I(XB), hi)
      if #gone > 0 then
        local ids = {}
        for i = 1, #gone do
          ids[i] = sub(gone[i], 2)
        end
        call("HDEL", kr, unpack(ids))
        xn = xn - call("ZREMRANGEBYSCORE", kz, I(XB), hi)
      end
    end
    np = wm1 + PRUNE_EVERY
  end
  if refresh then
    -- wall-clock expiry of dormant accounts, refreshed at most once per TTL_REFRESH
    call("PEXPIRE", kc, TTL)
    if dc1 + dc2 + dc3 + xn > 0 then
      call("PEXPIRE", kz, TTL)
    end
    call("PEXPIRE", kt, TTL)
    if xn > 0 then
      call("PEXPIRE", kr, TTL)
    end
    xp = wm1 + TTL_REFRESH
  end
  local m1 = pack(META, wm1, opt(fl), np, vp, opt(lm), opt(la), opt(lo), xp)
  local m2 = pack(META, tc1, ts1, tc2, ts2, tc3, ts3, tc4, ts4)
  local m3 = pack(META, tc5, ts5, tn, dc1, dc2, dc3, xn, opt(ve))
  -- one HSET, its arguments listed (no table to grow and unpack); the order of the fields (so
  -- the hash's layout) as when a bucket is first written
  if qv and dv then
    call("HSET", kc, qname, qv, dname, dv, "M1", m1, "M2", m2, "M3", m3)
  elseif qv or dv then
    call("HSET", kc, qv and qname or dname, qv or dv, "M1", m1, "M2", m2, "M3", m3)
  else
    call("HSET", kc, "M1", m1, "M2", m2, "M3", m3)
  end
  return record, APPLIED
end

-- The fields are arguments of their own: Redis builds ARGV in C, where splitting one payload
-- in Lua (find and sub per field) cost ~3 us per entry.
local F = ARGV
local nf = #F
local out, flags = {}, {}
local FLAG_BYTES = {} -- status * 2 + newest, as one byte: no string made per entry
for k = 0, 7 do
  FLAG_BYTES[k + 1] = string.char(k)
end
local i = 2
while i + 10 <= nf do
  local number, t, amt = unpack_struct("<Idd", F[i])
  local base = (number - 1) * 4
  local record, status = entry(KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], KEYS[base + 4],
    t, amt, F[i + 1], F[i + 2], F[i + 3], F[i + 4], F[i + 5], F[i + 6], F[i + 7], F[i + 8],
    F[i + 9], F[i + 10])
  out[#out + 1] = record
  if newest then
    status = status * 2 + 1
  else
    status = status * 2
  end
  flags[#flags + 1] = FLAG_BYTES[status + 1]
  i = i + 11
end
return table.concat(out) .. table.concat(flags)
