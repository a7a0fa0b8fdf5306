-- fraudstream velocity: every transaction of any number of accounts, updated and read in one call.
-- The semantics are those of shared/scoring/features.py (ReferenceVelocity); the key layout and
-- the reasons for it are in shared/scoring/velocity.py. The upper-case placeholders are filled
-- from VelocityConfig before the script is loaded.
--
-- Cost model (measured on Redis 7.0): a redis.call costs 1-2 us, turning a Lua number into a
-- string ~0.5 us, so the script makes few calls, reads only what leaves a window (the windows
-- are running totals), and takes times, bucket names and score bounds as strings from the
-- client wherever it can.
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
-- ARGV[2]: the entries, fields separated by \31, eleven per entry: account number (1-based, into
--          KEYS / 4), transaction id, event ms (13 digits), max(0, ms - 24 h + 1) (13 digits),
--          6-hour bucket, day bucket, amount (integer 1e-4 major units), merchant, country,
--          device, "lat lon" or "" when the transaction has no location
-- Returns: one string, per entry 19 little-endian doubles: status, then the 18 values.

local LATE = __LATE_MS__
local ID_CAP = __ID_CAP__
local LATE_CAP = __LATE_CAP__
local PRUNE_EVERY = __PRUNE_EVERY_MS__
local INDEX_PRUNE_EVERY = __INDEX_PRUNE_EVERY_MS__
local TTL = __TTL_MS__
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

local APPLIED, DUPLICATE, LATE_STATUS, UNKNOWN = 0, 1, 2, 3
local NAN = 0 / 0

local floor = math.floor
local find, sub, format = string.find, string.sub, string.format
local call = redis.call
local pack, unpack_struct = struct.pack, struct.unpack
local META = "<dddddddd"
local ROW = "<" .. string.rep("d", 19)
-- a stored result: located, lat, lon, then the 18 values (counts and distinct as int32)
local REC = "<Bddi4di4di4di4di4di4i4i4ddddd"
local BUCKET = "<dd"

local MODE = ARGV[1]
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

local function record_to_row(status, record)
  local _, _, _, c1, s1, c2, s2, c3, s3, c4, s4, c5, s5, dm, dc, dd, pv, pl, pa, po, ml =
    unpack_struct(REC, record)
  return pack(ROW, status, c1, s1, c2, s2, c3, s3, c4, s4, c5, s5, dm, dc, dd, pv, pl, pa, po, ml)
end

local function bucket(v)
  if not v then
    return 0, 0
  end
  return unpack_struct(BUCKET, v)
end

local function entry(kc, kz, kt, kr, txid, t_s, lo_s, bq_s, bd_s, amt_s, mer, cty, dev, loc)
  local t, amt = tonumber(t_s), tonumber(amt_s)
  local qname, dname = "q" .. bq_s, "d" .. bd_s
  local m = call("HMGET", kc, "M1", "M2", "M3", qname, dname)
  -- meta: M1 = watermark, horizon floor, next bucket prune, next index prune, newest located
  -- (ms, lat, lon), next TTL refresh; M2, M3 = running (count, sum) of the five windows, then
  -- the sizes of vt, of the three distinct kinds in vz and of the late index
  local wm0, fl, np, vp, lm, la, lo, xp
  local c1, s1, c2, s2, c3, s3, c4, s4, c5, s5 = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
  local tn, xn = 0, 0
  local dc = {0, 0, 0} -- members of each distinct kind in vz (exact: caps need no call)
  if m[1] then
    wm0, fl, np, vp, lm, la, lo, xp = unpack_struct(META, m[1])
    fl, np, vp, lm, xp = num(fl), num(np), num(vp), num(lm), num(xp)
    c1, s1, c2, s2, c3, s3, c4, s4 = unpack_struct(META, m[2])
    c5, s5, tn, dc[1], dc[2], dc[3], xn = unpack_struct("<ddddddd", m[3])
  end
  if not OWN and wm0 == nil then
    return pack("<d", UNKNOWN) .. string.rep(pack("<d", NAN), 18)
  end

  -- 1. Seen before: the result it got then. A replay carries the event time of the original,
  -- which is <= the watermark, so in-order traffic skips the lookup.
  if OWN and wm0 ~= nil and t <= wm0 then
    if t > wm0 - LATE then
      local same = call("ZRANGEBYSCORE", kt, t_s, t_s)
      for i = 1, #same do
        local id, record = tx_id_and_record(same[i])
        if id == txid then
          return record_to_row(DUPLICATE, record)
        end
      end
    end
    if xn > 0 then
      local r = call("HGET", kr, txid)
      if r and unpack_struct("<d", r) > wm0 - LATE then
        return record_to_row(LATE_STATUS, sub(r, 9))
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
  -- bucket leaves a window once, so this is O(1) amortized for in-order traffic.
  local tc, ts = {c1, c2, c3, c4, c5}, {s1, s2, s3, s4, s5}
  if wm0 ~= nil and wm1 > wm0 then
    for k = 1, 3 do
      local w = W[k]
      if wm1 - w >= wm0 then
        tc[k], ts[k] = 0, 0
      elseif tc[k] > 0 then
        local gone = call("ZRANGEBYSCORE", kt, wm0 - w + 1, wm1 - w)
        for i = 1, #gone do
          tc[k], ts[k] = tc[k] - 1, ts[k] - tx_amount(gone[i])
        end
      end
    end
    local names, owner = {}, {}
    local b0, b1 = floor(wm0 / Q), floor(wm1 / Q)
    if b1 > b0 then
      if b1 - 28 >= b0 then
        tc[4], ts[4] = 0, 0
      elseif tc[4] > 0 then
        for idx = b0 - 27, b1 - 28 do
          names[#names + 1] = "q" .. idx
          owner[#owner + 1] = 4
        end
      end
    end
    b0, b1 = floor(wm0 / DAY), floor(wm1 / DAY)
    if b1 > b0 then
      if b1 - 30 >= b0 then
        tc[5], ts[5] = 0, 0
      elseif tc[5] > 0 then
        for idx = b0 - 29, b1 - 30 do
          names[#names + 1] = "d" .. idx
          owner[#owner + 1] = 5
        end
      end
    end
    if #names > 0 then
      local got = call("HMGET", kc, unpack(names))
      for i = 1, #names do
        if got[i] then
          local c, s = bucket(got[i])
          local k = owner[i]
          tc[k], ts[k] = tc[k] - c, ts[k] - s
        end
      end
    end
  end

  -- 4. The transaction's own windows: the totals when they end where it is, else (out of
  -- order) summed explicitly over what retention still holds.
  local hc, hs = {tc[1], tc[2], tc[3], tc[4], tc[5]}, {ts[1], ts[2], ts[3], ts[4], ts[5]}
  if not inorder then
    local lo24 = t - DAY
    if wm1 - LATE > lo24 then
      lo24 = wm1 - LATE
    end
    hc[1], hs[1], hc[2], hs[2], hc[3], hs[3] = 0, 0, 0, 0, 0, 0
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
    local tiers = {{"q", Q, 28, R_Q, 4}, {"d", DAY, 30, R_D, 5}}
    for x = 1, 2 do
      local prefix, g, w, r, k = tiers[x][1], tiers[x][2], tiers[x][3], tiers[x][4], tiers[x][5]
      local bt, bw = floor(t / g), floor(wm1 / g)
      if bt ~= bw then
        hc[k], hs[k] = 0, 0
        local lo_b = bt - w
        if bw - r > lo_b then
          lo_b = bw - r
        end
        for idx = lo_b + 1, bt do
          names[#names + 1] = prefix .. idx
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
  end
  if OWN then
    for k = 1, 5 do
      hc[k], hs[k] = hc[k] + 1, hs[k] + amt
    end
  end

  -- 5. Distinct merchants, countries, devices (last seen > t - 24 h), the merchant's last visit.
  local own_dim = {mer, cty, dev}
  local sc = call("ZMSCORE", kz, "m" .. mer, "c" .. cty, "d" .. dev)
  local old, dn = {}, {0, 0, 0}
  for j = 1, 3 do
    if sc[j] then
      old[j] = tonumber(sc[j]) - DIM_BASE[j]
    end
    local lo_j = t - DAY
    if wm1 - DIM_RET[j] > lo_j then
      lo_j = wm1 - DIM_RET[j] -- only for a LATE transaction
    end
    if OWN and dc[j] == 1 and old[j] ~= nil then
      dn[j] = 1 -- the kind's only member is this transaction's own (typical for countries)
    else
      if dc[j] > 0 then
        local bound
        if lo_j == t - DAY then
          bound = DIM_TAG[j] .. lo_s
        else
          bound = I(DIM_BASE[j] + lo_j + 1)
        end
        dn[j] = call("ZCOUNT", kz, bound, DIM_TOP[j])
      end
      if OWN and own_dim[j] ~= "" and not (old[j] ~= nil and old[j] > lo_j) then
        dn[j] = dn[j] + 1
      end
    end
  end
  local mer_last = nil
  if OWN and old[1] ~= nil and old[1] > wm1 - R_M then
    mer_last = old[1]
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

  local values = {hc[1], hs[1], hc[2], hs[2], hc[3], hs[3], hc[4], hs[4], hc[5], hs[5], dn[1],
    dn[2], dn[3], opt(prev), opt(ploc), opt(plat), opt(plon), opt(mer_last)}
  if MODE ~= "A" then
    return pack(ROW, status, unpack(values))
  end

  -- 7. Writes.
  local located, my_lat, my_lon = 0, NAN, NAN
  if loc ~= "" then
    local sp = find(loc, " ", 1, true)
    located, my_lat, my_lon = 1, tonumber(sub(loc, 1, sp - 1)), tonumber(sub(loc, sp + 1))
  end
  local record = pack(REC, located, my_lat, my_lon, unpack(values))
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
    call("HSET", kc, "M3", pack("<ddddddd", tc[5], ts[5], tn, dc[1], dc[2], dc[3], xn))
    return pack(ROW, status, unpack(values))
  end

  -- the totals now end at wm1; the transaction joins the windows it falls in
  for k = 1, 3 do
    if t > wm1 - W[k] then
      tc[k], ts[k] = tc[k] + 1, ts[k] + amt
    end
  end
  local bq, bd = tonumber(bq_s), tonumber(bd_s)
  local qw, dw = floor(wm1 / Q), floor(wm1 / DAY)
  if bq > qw - 28 then
    tc[4], ts[4] = tc[4] + 1, ts[4] + amt
  end
  if bd > dw - 30 then
    tc[5], ts[5] = tc[5] + 1, ts[5] + amt
  end

  local fields = {}
  if bq > qw - R_Q then
    local c, s = bucket(m[4])
    fields[1], fields[2] = qname, pack(BUCKET, c + 1, s + amt)
  end
  if bd > dw - R_D then
    local c, s = bucket(m[5])
    fields[#fields + 1] = dname
    fields[#fields + 1] = pack(BUCKET, c + 1, s + amt)
  end
  if located == 1 and (lm == nil or t >= lm) then
    lm, la, lo = t, my_lat, my_lon
  end

  local z = {}
  for j = 1, 3 do
    if own_dim[j] ~= "" then
      z[#z + 1] = DIM_TAG[j] .. t_s
      z[#z + 1] = DIM_PREFIX[j] .. own_dim[j]
    end
  end
  if #z > 0 then
    local before = dc[1] + dc[2] + dc[3] + xn
    call("ZADD", kz, "GT", unpack(z))
    if before == 0 then
      call("PEXPIRE", kz, TTL)
    end
    for j = 1, 3 do
      if own_dim[j] ~= "" and old[j] == nil then
        dc[j] = dc[j] + 1
      end
    end
  end
  call("ZADD", kt, t_s, pack("<dH", amt, #txid) .. txid .. record)
  if tn == 0 then
    call("PEXPIRE", kt, TTL)
  end
  tn = tn + 1
  if vp == nil or wm1 >= vp then
    -- ids past the late tolerance go at most INDEX_PRUNE_EVERY late: vt holds the stored
    -- results, the bulk of an account's memory
    tn = tn - call("ZREMRANGEBYSCORE", kt, "-inf", wm1 - LATE)
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
      for w = 1, 3 do
        if ms > wm1 - W[w] then
          tc[w], ts[w] = tc[w] - 1, ts[w] - a
        end
      end
    end
    tn = tn - k
  end
  for j = 1, 3 do
    if own_dim[j] ~= "" and old[j] == nil and dc[j] > DIM_CAP[j] then
      local base = DIM_BASE[j]
      local evict = call("ZRANGEBYSCORE", kz, base, DIM_TOP[j], "LIMIT", 0, dc[j] - DIM_CAP[j])
      dc[j] = dc[j] - call("ZREM", kz, unpack(evict))
    end
  end

  -- 8. Buckets and merchants are pruned at most once per PRUNE_EVERY of event time. Reads
  -- already ignore what is past retention, so this only bounds memory.
  if np == nil or wm1 >= np then
    local del = {}
    local tiers = {{"q", Q, R_Q}, {"d", DAY, R_D}}
    for x = 1, 2 do
      local prefix, g, r = tiers[x][1], tiers[x][2], tiers[x][3]
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
          del[#del + 1] = prefix .. idx
        end
      end
    end
    if #del > 0 then
      call("HDEL", kc, unpack(del))
    end
    -- only merchants are pruned by time: countries and devices are few, and their caps bound
    -- them (reads ignore members past retention either way)
    if dc[1] > 0 then
      dc[1] = dc[1] - call("ZREMRANGEBYSCORE", kz, "-inf", wm1 - R_M)
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
  if xp == nil or wm1 >= xp then
    -- wall-clock expiry of dormant accounts, refreshed at most once per TTL_REFRESH
    call("PEXPIRE", kc, TTL)
    if dc[1] + dc[2] + dc[3] + xn > 0 then
      call("PEXPIRE", kz, TTL)
    end
    call("PEXPIRE", kt, TTL)
    if xn > 0 then
      call("PEXPIRE", kr, TTL)
    end
    xp = wm1 + TTL_REFRESH
  end
  fields[#fields + 1] = "M1"
  fields[#fields + 1] = pack(META, wm1, opt(fl), np, vp, opt(lm), opt(la), opt(lo), xp)
  fields[#fields + 1] = "M2"
  fields[#fields + 1] = pack(META, tc[1], ts[1], tc[2], ts[2], tc[3], ts[3], tc[4], ts[4])
  fields[#fields + 1] = "M3"
  fields[#fields + 1] = pack("<ddddddd", tc[5], ts[5], tn, dc[1], dc[2], dc[3], xn)
  call("HSET", kc, unpack(fields))
  return pack(ROW, APPLIED, unpack(values))
end

-- split the payload once; the loop ends at the last separator
local F = {}
do
  local s = ARGV[2]
  local pos, nf = 1, 0
  while true do
    local e = find(s, "\31", pos, true)
    nf = nf + 1
    if e == nil then
      F[nf] = sub(s, pos)
      break
    end
    F[nf] = sub(s, pos, e - 1)
    pos = e + 1
  end
end

local out = {}
local i = 1
while i + 10 <= #F do
  local base = (tonumber(F[i]) - 1) * 4
  out[#out + 1] = entry(KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], KEYS[base + 4], F[i + 1],
    F[i + 2], F[i + 3], F[i + 4], F[i + 5], F[i + 6], F[i + 7], F[i + 8], F[i + 9], F[i + 10])
  i = i + 11
end
return table.concat(out)
